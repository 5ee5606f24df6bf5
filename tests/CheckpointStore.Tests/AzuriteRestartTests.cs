// Blob storage that goes away for a while: real Azurite stopped mid-upload and started again on the same port and data folder.
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.CheckpointStore.Tests.Infrastructure;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Tests.Infrastructure.ShardFiles;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class AzuriteRestartTests : IAsyncLifetime
{
    readonly string _data = Path.Combine(Path.GetTempPath(), $"azurite-restart-{Guid.NewGuid():N}");
    AzuriteServer _azurite = null!;
    StoreHost _host = null!;

    /// <summary>
    /// Riding out a restart: 12 tries, 500 ms doubling to at most 5 s, about 40 s of outage per call (the SDK jitters each
    /// wait by ±20%) — far more than Azurite needs to start, even on a loaded 2-core machine.
    /// </summary>
    static readonly StorageOptions Patient = new() { RetryCount = 12, RetryBaseDelayMs = 500, RetryMaxDelayMs = 5000, NetworkTimeoutSeconds = 10 };

    /// <summary>Giving up: 4 tries, 200 ms doubling, about 1.4 s of outage; Azurite stays down far longer in the test.</summary>
    static readonly StorageOptions Brief = new() { RetryCount = 4, RetryBaseDelayMs = 200, RetryMaxDelayMs = 1000, NetworkTimeoutSeconds = 5 };

    Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient Client => _host.Client;

    public async Task InitializeAsync() => _azurite = await AzuriteServer.StartAsync(_data);

    async Task StartStoreAsync(StorageOptions retry) =>
        _host = await StoreHost.StartAsync(new Dictionary<string, string?>
        {
            ["ConnectionStrings:blobs"] = AzuriteServer.ConnectionString(_azurite.Port),
            ["Storage:RetryCount"] = retry.RetryCount.ToString(),
            ["Storage:RetryBaseDelayMs"] = retry.RetryBaseDelayMs.ToString(),
            ["Storage:RetryMaxDelayMs"] = retry.RetryMaxDelayMs.ToString(),
            ["Storage:NetworkTimeoutSeconds"] = retry.NetworkTimeoutSeconds.ToString(),
        });

    public async Task DisposeAsync()
    {
        if (_host is not null) await _host.DisposeAsync();
        if (_azurite is not null) await _azurite.DisposeAsync();
        if (Directory.Exists(_data)) Directory.Delete(_data, recursive: true);
    }

    static string NewJob() => $"job-{Guid.NewGuid():N}"[..20];

    async Task<long[]> CommittedStepsAsync(string job) =>
        (await Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job })).Checkpoints.Select(c => c.Step).ToArray();

    async Task AssertLoadsBitwiseAsync(string job, long step, ShardFile file)
    {
        foreach (var tensor in file.Tensors)
        {
            var (_, bytes) = await DownloadAsync(Client, new DownloadTensorRequest { Job = job, Step = step, TensorName = tensor.Name });
            Assert.Equal(tensor.Bytes, bytes);
        }
    }

    [Fact]
    public async Task AzuriteStoppedMidUploadAndBackWithinTheRetryWindowTheUploadCompletesAndTheCheckpointCommitsAndRoundTrips()
    {
        Assert.True(Patient.RetryBudget > TimeSpan.FromSeconds(35), $"the retry budget is {Patient.RetryBudget}");
        await StartStoreAsync(Patient);
        string job = NewJob();
        var first = Rank(0, seed: 50);
        await UploadAsync(Client, job, 1, 0, first);
        await CommitAsync(Client, job, 1, 1, first);

        var next = Rank(0, seed: 51, rows: 512, cols: 512); // 1 MiB: sixteen 64 KiB blocks
        using var call = Client.UploadShard();
        await call.RequestStream.WriteAsync(new UploadShardMessage
        {
            Header = new UploadHeader { Job = job, Step = 2, Rank = 0, FileName = next.FileName, TotalSize = next.Bytes.Length, Sha256 = next.Sha256 },
        });
        Task? restart = null;
        const int chunk = 16 * 1024;
        for (int at = 0; at < next.Bytes.Length; at += chunk)
        {
            if (at == 256 * 1024)
            {
                // The store has at most these 256 KiB; every block after them is staged while Azurite is down or starting.
                await _azurite.StopAsync();
                Assert.False(_azurite.Running);
                restart = _azurite.StartAgainAsync();
            }
            try
            {
                await call.RequestStream.WriteAsync(new UploadShardMessage
                {
                    Chunk = new UploadChunk { Offset = at, Data = Google.Protobuf.ByteString.CopyFrom(next.Bytes, at, Math.Min(chunk, next.Bytes.Length - at)) },
                });
            }
            catch (Exception e) when (e is RpcException or InvalidOperationException)
            {
                break; // the store ended the call: its status is the response's, thrown below
            }
        }
        try { await call.RequestStream.CompleteAsync(); }
        catch (Exception e) when (e is RpcException or InvalidOperationException) { }
        var reply = await call.ResponseAsync;
        await restart!;

        Assert.Equal(next.Sha256, reply.Sha256);
        Assert.Equal(next.Bytes.Length, reply.Size);
        await CommitAsync(Client, job, 2, 1, next);
        Assert.Equal(new long[] { 1L, 2L }, await CommittedStepsAsync(job));
        await AssertLoadsBitwiseAsync(job, 2, next);
        await AssertLoadsBitwiseAsync(job, 1, first); // kept across the restart
    }

    [Fact]
    public async Task AzuriteDownLongerThanTheRetryBudgetGivesAClearErrorNamingTheEndpointAndTheNextSaveSucceedsOnceItIsBack()
    {
        await StartStoreAsync(Brief);
        string job = NewJob();
        var first = Rank(0, seed: 60);
        await UploadAsync(Client, job, 1, 0, first);
        await CommitAsync(Client, job, 1, 1, first);

        await _azurite.StopAsync();
        var next = Rank(0, seed: 61, rows: 256, cols: 256);
        var failure = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 2, 0, next));
        Assert.Equal(StatusCode.Unavailable, failure.StatusCode);
        Assert.Contains($"Blob storage at {_azurite.BlobEndpoint}/", failure.Status.Detail);
        Assert.Contains($"after {Brief.RetryCount} tries", failure.Status.Detail);

        await _azurite.StartAgainAsync();
        Assert.Equal(new long[] { 1L }, await CommittedStepsAsync(job));
        await AssertLoadsBitwiseAsync(job, 1, first); // the committed checkpoint is intact

        var reply = await UploadAsync(Client, job, 2, 0, next); // the next save tries again, from scratch
        Assert.Equal(next.Sha256, reply!.Sha256);
        await CommitAsync(Client, job, 2, 1, next);
        Assert.Equal(new long[] { 1L, 2L }, await CommittedStepsAsync(job));
        await AssertLoadsBitwiseAsync(job, 2, next);
    }
}
