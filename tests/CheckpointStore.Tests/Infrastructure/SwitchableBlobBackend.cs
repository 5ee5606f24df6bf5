// Wraps a blob backend so a test can make it unreachable: every call fails as a lost disk or mount would.
using DeepSeekCluster.CheckpointStore.Storage;

namespace DeepSeekCluster.CheckpointStore.Tests.Infrastructure;

public sealed class SwitchableBlobBackend(IBlobBackend inner) : IBlobBackend
{
    public volatile bool Unreachable;

    public string Location => inner.Location;
    public bool RetriesItself => inner.RetriesItself;

    private void Check()
    {
        if (Unreachable) throw new IOException($"Input/output error: {inner.Location} is unreachable");
    }

    public Task<long> GetStagedLengthAsync(string key, string stageId, CancellationToken ct) { Check(); return inner.GetStagedLengthAsync(key, stageId, ct); }
    public Task AppendStagedAsync(string key, string stageId, long offset, ReadOnlyMemory<byte> data, CancellationToken ct) { Check(); return inner.AppendStagedAsync(key, stageId, offset, data, ct); }
    public Task CommitStagedAsync(string key, string stageId, long length, IReadOnlyDictionary<string, string> metadata, CancellationToken ct) { Check(); return inner.CommitStagedAsync(key, stageId, length, metadata, ct); }
    public Task<bool> PutAsync(string key, ReadOnlyMemory<byte> data, IReadOnlyDictionary<string, string> metadata, bool onlyIfAbsent, CancellationToken ct) { Check(); return inner.PutAsync(key, data, metadata, onlyIfAbsent, ct); }
    public Task SetMetadataAsync(string key, IReadOnlyDictionary<string, string> metadata, CancellationToken ct) { Check(); return inner.SetMetadataAsync(key, metadata, ct); }
    public Task<BlobEntry?> GetInfoAsync(string key, CancellationToken ct) { Check(); return inner.GetInfoAsync(key, ct); }
    public Task ReadAsync(string key, long offset, Memory<byte> buffer, CancellationToken ct) { Check(); return inner.ReadAsync(key, offset, buffer, ct); }
    public Task<IReadOnlyList<BlobEntry>> ListAsync(string prefix, bool includeStaged, CancellationToken ct) { Check(); return inner.ListAsync(prefix, includeStaged, ct); }
    public Task DeleteAsync(string key, CancellationToken ct) { Check(); return inner.DeleteAsync(key, ct); }
}
