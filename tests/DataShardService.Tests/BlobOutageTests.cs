// Blob storage going away and coming back: reads retry with backoff through a restart of real Azurite, a longer
// outage fails naming the endpoint, and nothing partial is ever cached or served.
using System.Security.Cryptography;
using Azure.Core;
using Azure.Core.Pipeline;
using Azure.Storage.Blobs;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Storage;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class BlobOutageTests : IAsyncLifetime
{
    private const string Shard = "ds-outage/train-00000.bin";
    private readonly RestartableAzurite _azurite = new();
    private readonly string _cacheDir = TestCorpus.NewFolder("outage-cache");
    private readonly string _container = $"outage-{Guid.NewGuid():N}"[..20];
    private readonly byte[] _bytes = RandomNumberGenerator.GetBytes(3 << 20);
    private string _sha256 = "";

    public async Task InitializeAsync()
    {
        await _azurite.StartAsync();
        _sha256 = Convert.ToHexStringLower(SHA256.HashData(_bytes));
        var writer = Store(new BlobRetry());
        await writer.PutStreamAsync(new MemoryStream(_bytes), Shard, CancellationToken.None);
    }

    public async Task DisposeAsync()
    {
        await _azurite.DisposeAsync();
        if (Directory.Exists(_cacheDir)) Directory.Delete(_cacheDir, recursive: true);
    }

    [Fact]
    public async Task AShardReadRidesOutARestartOfStorageWithinTheRetryWindow()
    {
        // Up to 12 retries, 0.5 s doubling to at most 4 s: about 40 s of backoff, far more than a restart takes.
        // The service's retry options, plus a policy that counts every try this client sends (first and retries).
        var options = new BlobRetry(12, TimeSpan.FromSeconds(0.5), TimeSpan.FromSeconds(4), TimeSpan.FromSeconds(30)).ToClientOptions();
        var tries = new TryCounter();
        options.AddPolicy(tries, HttpPipelinePosition.PerRetry);
        var store = new AzureDatasetStore(new BlobServiceClient(_azurite.ConnectionString, options).GetBlobContainerClient(_container), _cacheDir, 65536);

        await _azurite.StopAsync();
        var read = store.GetVerifiedLocalFileAsync(Shard, _bytes.Length, _sha256, CancellationToken.None);
        // The read is under way and failing: wait until the policy has sent a retry, then bring storage back.
        await PollAsync(() => tries.Count >= 2 || read.IsCompleted, TimeSpan.FromSeconds(60), "a retry of the shard read");
        Assert.False(read.IsCompleted, read.Exception?.ToString());
        await _azurite.StartAsync();

        var copy = await read;
        Assert.Equal(LocalCopyKind.Downloaded, copy.Kind);
        Assert.Equal(_bytes, await File.ReadAllBytesAsync(copy.Path));
        Assert.Equal([copy.Path], CachedFiles());
    }

    [Fact]
    public async Task ALongerOutageFailsNamingTheEndpointAndLeavesNothingInTheCache()
    {
        var store = Store(new BlobRetry(2, TimeSpan.FromSeconds(0.1), TimeSpan.FromSeconds(0.2), TimeSpan.FromSeconds(10)));
        await _azurite.StopAsync();

        var e = await Assert.ThrowsAsync<DataInputException>(() => store.GetVerifiedLocalFileAsync(Shard, _bytes.Length, _sha256, CancellationToken.None));
        Assert.Equal(DataErrorKind.Unavailable, e.Kind);
        Assert.Contains($"http://127.0.0.1:{_azurite.Port}/devstoreaccount1/{_container}", e.Message);
        Assert.Contains(Shard, e.Message);
        Assert.Empty(CachedFiles()); // no partial download, no cached copy

        // Writes fail the same way, and nothing half-written appears once storage is back.
        var put = await Assert.ThrowsAsync<DataInputException>(() =>
            store.PutStreamAsync(new MemoryStream(_bytes), "ds-outage/train-00001.bin", CancellationToken.None));
        Assert.Equal(DataErrorKind.Unavailable, put.Kind);
        Assert.Contains($"127.0.0.1:{_azurite.Port}", put.Message);

        await _azurite.StartAsync();
        Assert.False(await store.ExistsAsync("ds-outage/train-00001.bin", CancellationToken.None));
        var copy = await store.GetVerifiedLocalFileAsync(Shard, _bytes.Length, _sha256, CancellationToken.None);
        Assert.Equal(_bytes, await File.ReadAllBytesAsync(copy.Path));
    }

    [Fact]
    public async Task TheServiceAnswersUnavailableNamingTheEndpointWhenStorageStaysDown()
    {
        // The retry settings come from configuration, as in a deployment; two quick retries, then the error.
        string input = TestCorpus.NewFolder("outage-input");
        string file = TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(3));
        string work = TestCorpus.NewFolder("outage-work");
        await using var host = await ServiceHost.StartAsync(new Dictionary<string, string?>
        {
            ["ConnectionStrings:blobs"] = _azurite.ConnectionString,
            ["DataShards:Container"] = _container,
            ["DataShards:CacheDir"] = _cacheDir,
            ["DataShards:WorkDir"] = work,
            ["DataShards:BlobRetries"] = "2",
            ["DataShards:BlobRetryDelaySeconds"] = "0.1",
            ["DataShards:BlobRetryMaxDelaySeconds"] = "0.2",
        });
        await _azurite.StopAsync();

        var e = await Assert.ThrowsAsync<Grpc.Core.RpcException>(() =>
            host.Client.PrepareAsync(TestCorpus.Request(32, 259, 1000, new Contracts.DataShards.Source { Name = "bible", Path = file })).ResponseAsync);
        Assert.Equal(Grpc.Core.StatusCode.Unavailable, e.StatusCode);
        Assert.Contains($"http://127.0.0.1:{_azurite.Port}/devstoreaccount1/{_container}", e.Status.Detail);
        Directory.Delete(input, recursive: true);
        Directory.Delete(work, recursive: true);
    }

    [Fact]
    public async Task AShardWhoseBytesChangedInStorageIsNeitherServedNorCached()
    {
        // Storage hands back other bytes than the manifest promised (a partial or overwritten blob).
        var store = Store(new BlobRetry());
        await store.PutStreamAsync(new MemoryStream(_bytes[..(_bytes.Length / 2)]), Shard, CancellationToken.None);
        var e = await Assert.ThrowsAsync<DataInputException>(() => store.GetVerifiedLocalFileAsync(Shard, _bytes.Length, _sha256, CancellationToken.None));
        Assert.Equal(DataErrorKind.Corrupt, e.Kind);
        Assert.Empty(CachedFiles());
    }

    private sealed class TryCounter : HttpPipelineSynchronousPolicy
    {
        private int _count;

        public int Count => Volatile.Read(ref _count);

        public override void OnSendingRequest(HttpMessage message) => Interlocked.Increment(ref _count);
    }

    private AzureDatasetStore Store(BlobRetry retry) => AzureDatasetStore.Create(_azurite.ConnectionString, _container, _cacheDir, 65536, retry);

    private List<string> CachedFiles() =>
        Directory.Exists(_cacheDir) ? Directory.GetFiles(_cacheDir, "*", SearchOption.AllDirectories).ToList() : [];

    private static async Task PollAsync(Func<bool> condition, TimeSpan deadline, string what)
    {
        var until = DateTime.UtcNow + deadline;
        while (!condition())
        {
            if (DateTime.UtcNow > until) throw new TimeoutException($"No {what} within {deadline.TotalSeconds} s.");
            await Task.Delay(20);
        }
    }
}
