// Opens prepared datasets for serving: the manifest once, each shard's SHA-256 checked on first use, samples read in O(1).
using System.Buffers.Binary;
using System.Collections.Concurrent;
using DeepSeekCluster.DataShardService.Metrics;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Storage;
using Microsoft.Win32.SafeHandles;

namespace DeepSeekCluster.DataShardService.Serving;

public sealed class DatasetCatalog(IDatasetStore store, DataShardsMetrics? metrics = null)
{
    private readonly ConcurrentDictionary<string, Lazy<Task<OpenDataset>>> _open = new();

    public async Task<OpenDataset> OpenAsync(string datasetId, CancellationToken ct)
    {
        if (string.IsNullOrWhiteSpace(datasetId) || datasetId.Contains('/') || datasetId.Contains('\\') || datasetId.Contains(".."))
            throw DataInputException.Invalid($"'{datasetId}' is not a dataset id (expected e.g. 'ds-0123456789abcdef').");
        var lazy = _open.GetOrAdd(datasetId, id => new Lazy<Task<OpenDataset>>(() => LoadAsync(id)));
        try
        {
            return await lazy.Value.WaitAsync(ct);
        }
        catch (DataInputException)
        {
            _open.TryRemove(new KeyValuePair<string, Lazy<Task<OpenDataset>>>(datasetId, lazy)); // it may be prepared later
            throw;
        }
    }

    /// <summary>The tokenizer.json stored with a dataset.</summary>
    public async Task<string> ReadTokenizerAsync(string datasetId, CancellationToken ct)
    {
        var dataset = await OpenAsync(datasetId, ct);
        string path = $"{datasetId}/{dataset.Manifest.TokenizerPath}";
        return await store.ReadTextAsync(path, ct)
            ?? throw new DataInputException(DataErrorKind.Corrupt, $"Dataset '{datasetId}' has a manifest but no tokenizer at {store.Describe(path)}.");
    }

    private async Task<OpenDataset> LoadAsync(string datasetId)
    {
        string path = $"{datasetId}/{DatasetManifest.FileName}";
        string json = await store.ReadTextAsync(path, CancellationToken.None)
            ?? throw new DataInputException(DataErrorKind.NotFound,
                $"Dataset '{datasetId}' does not exist (no complete manifest at {store.Describe(path)}).");
        return new OpenDataset(store, DatasetManifest.FromJson(json, store.Describe(path)), metrics);
    }
}

public sealed class OpenDataset(IDatasetStore store, DatasetManifest manifest, DataShardsMetrics? metrics = null)
{
    private readonly ConcurrentDictionary<string, Lazy<Task<VerifiedShard>>> _shards = new();

    public DatasetManifest Manifest { get; } = manifest;

    public SplitEntry Split(string split) =>
        Manifest.Splits.TryGetValue(split, out var entry) ? entry
            : throw DataInputException.Invalid(
                $"Dataset '{Manifest.DatasetId}' has no split '{split}' (it has {string.Join(", ", Manifest.Splits.Keys)}).");

    /// <summary>Reads sample <paramref name="index"/> of a split into <paramref name="tokens"/> (SampleTokens long).</summary>
    public async Task ReadSampleAsync(string split, long index, uint[] tokens, CancellationToken ct)
    {
        var entry = Split(split);
        // Every shard but the last holds SamplesPerShard samples, so the shard and offset are one division away.
        int shardIndex = (int)(index / Manifest.SamplesPerShard);
        long inShard = index % Manifest.SamplesPerShard;
        var shard = await ShardAsync(entry.Shards[shardIndex], ct);
        var record = new byte[Manifest.RecordBytes];
        int got = await RandomAccess.ReadAsync(shard.Handle, record, inShard * Manifest.RecordBytes, ct);
        if (got != record.Length)
            throw new DataInputException(DataErrorKind.Corrupt, $"Shard {shard.Describe} ended inside sample {inShard}.");
        if (Manifest.TokenType == "uint16")
            for (int i = 0; i < tokens.Length; i++) tokens[i] = BinaryPrimitives.ReadUInt16LittleEndian(record.AsSpan(2 * i));
        else
            for (int i = 0; i < tokens.Length; i++) tokens[i] = BinaryPrimitives.ReadUInt32LittleEndian(record.AsSpan(4 * i));
    }

    private async Task<VerifiedShard> ShardAsync(ShardEntry entry, CancellationToken ct)
    {
        var lazy = _shards.GetOrAdd(entry.Path, _ => new Lazy<Task<VerifiedShard>>(() => VerifyAsync(entry)));
        try
        {
            return await lazy.Value.WaitAsync(ct);
        }
        catch (DataInputException)
        {
            // Never remember a bad shard as good, nor as bad for ever: the next request checks it again.
            _shards.TryRemove(new KeyValuePair<string, Lazy<Task<VerifiedShard>>>(entry.Path, lazy));
            throw;
        }
    }

    private async Task<VerifiedShard> VerifyAsync(ShardEntry entry)
    {
        string path = $"{Manifest.DatasetId}/{entry.Path}";
        // The store checks length and SHA-256 before it hands out a path; a corrupt copy never gets this far.
        var copy = await store.GetVerifiedLocalFileAsync(path, entry.Bytes, entry.Sha256, CancellationToken.None);
        if (copy.Kind == LocalCopyKind.CacheHit) metrics?.CacheHit();
        else if (copy.Kind == LocalCopyKind.Downloaded) metrics?.CacheMiss();
        var handle = File.OpenHandle(copy.Path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.RandomAccess);
        return new VerifiedShard(handle, store.Describe(path));
    }

    private sealed record VerifiedShard(SafeFileHandle Handle, string Describe);
}
