// Behaviour only blob storage has: staged uploads that publish at commit, and the verified local shard cache.
using System.Text;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class AzureStoreTests(AzuriteBackend backend) : IClassFixture<AzuriteBackend>
{
    [Fact]
    public async Task AnInterruptedUploadLeavesNoBlobAndThePreviousVersionIntact()
    {
        var testStore = (AzuriteTestStore)backend.NewStore();
        var store = testStore.OpenDirectly(blockBytes: 65536);
        byte[] first = RandomBytes(200_000, seed: 1);
        await store.PutStreamAsync(new MemoryStream(first), "ds-x/train-00000.bin", CancellationToken.None);

        // The second version fails after two of its four blocks were staged: readers must still see the first one.
        await Assert.ThrowsAsync<IOException>(() => store.PutStreamAsync(
            new FailingStream(RandomBytes(250_000, seed: 2), failAfter: 150_000), "ds-x/train-00000.bin", CancellationToken.None));
        Assert.Equal(first, await testStore.ReadAsync("ds-x/train-00000.bin"));

        // A new object whose upload fails does not exist at all.
        await Assert.ThrowsAsync<IOException>(() => store.PutStreamAsync(
            new FailingStream(RandomBytes(250_000, seed: 3), failAfter: 100_000), "ds-x/train-00001.bin", CancellationToken.None));
        Assert.False(await store.ExistsAsync("ds-x/train-00001.bin", CancellationToken.None));
        Assert.Equal(["ds-x/train-00000.bin"], await testStore.ListAsync());
    }

    [Fact]
    public async Task ShardsAreCachedOnFirstReadAndACorruptCachedCopyIsFetchedAgainNeverServed()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(40));
        var store = (AzuriteTestStore)backend.NewStore();
        string datasetId;
        long samples;
        List<Sample> firstRead;
        int shards;
        await using (var host = await ServiceHost.StartAsync(store))
        {
            var reply = await host.Client.PrepareAsync(TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input }));
            (datasetId, samples) = (reply.DatasetId, reply.TrainSamples);
            shards = (int)((samples + 299) / 300);
            Assert.True(shards >= 2);
            using var metrics = new MetricRecorder(host);
            firstRead = await FetchAllAsync(host, datasetId, samples);
            Assert.Equal(shards, metrics.Sum("deepseek.data.cache_misses")); // every shard downloaded once
            Assert.Equal(0, metrics.Sum("deepseek.data.cache_hits"));
        }

        string cached = Path.Combine(store.CacheDir, datasetId, "train-00001.bin");
        var bytes = await File.ReadAllBytesAsync(cached);
        bytes[10] ^= 0x40;
        await File.WriteAllBytesAsync(cached, bytes);

        await using (var host = await ServiceHost.StartAsync(store)) // a restart: same cache folder, nothing open yet
        {
            using var metrics = new MetricRecorder(host);
            var secondRead = await FetchAllAsync(host, datasetId, samples);
            Assert.Equal(firstRead.Select(s => s.Tokens.ToArray()), secondRead.Select(s => s.Tokens.ToArray()));
            Assert.Equal(shards - 1, metrics.Sum("deepseek.data.cache_hits"));
            Assert.Equal(1, metrics.Sum("deepseek.data.cache_misses")); // the damaged copy, replaced by a verified download
        }
        Assert.Equal(await store.ReadAsync($"{datasetId}/train-00001.bin"), await File.ReadAllBytesAsync(cached));
        Assert.Empty(Directory.GetFiles(store.CacheDir, "*.download-*", SearchOption.AllDirectories));
        Directory.Delete(input, true);
    }

    [Fact]
    public async Task ACorruptRemoteShardIsNeverCached()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(30));
        var store = (AzuriteTestStore)backend.NewStore();
        await using var host = await ServiceHost.StartAsync(store);
        var reply = await host.Client.PrepareAsync(TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input }));
        string shard = $"{reply.DatasetId}/train-00000.bin";
        var bytes = await store.ReadAsync(shard);
        await store.WriteAsync(shard, bytes[..^2]); // truncated

        var e = await Assert.ThrowsAsync<RpcException>(() => FetchAllAsync(host, reply.DatasetId, 5));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains(shard, e.Status.Detail);
        // Other shards the permutation touched first may be cached; the corrupt one, and any partial download of it, not.
        Assert.False(File.Exists(Path.Combine(store.CacheDir, reply.DatasetId, "train-00000.bin")));
        Assert.Empty(Directory.GetFiles(store.CacheDir, "*.download-*", SearchOption.AllDirectories));
        Directory.Delete(input, true);
    }

    private static async Task<List<Sample>> FetchAllAsync(ServiceHost host, string datasetId, long count)
    {
        using var call = host.Client.GetBatch(new GetBatchRequest { DatasetId = datasetId, Seed = 3, Start = 0, Count = (int)count });
        var samples = new List<Sample>();
        await foreach (var s in call.ResponseStream.ReadAllAsync())
            samples.Add(s);
        return samples;
    }

    private static byte[] RandomBytes(int n, int seed)
    {
        var bytes = new byte[n];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    /// <summary>Reads like a MemoryStream, then throws once <paramref name="failAfter"/> bytes were read: a put killed midway.</summary>
    private sealed class FailingStream(byte[] data, int failAfter) : MemoryStream(data, writable: false)
    {
        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken ct = default)
        {
            if (Position >= failAfter)
                throw new IOException("the test cut the upload");
            return base.ReadAsync(buffer[..(int)Math.Min(buffer.Length, failAfter - Position)], ct);
        }
    }
}

public sealed class StoreOptionsTests
{
    [Theory]
    [InlineData("ConnectionStrings:blobs", "AccountName=x;AccountKey=not-base64!!;Nonsense", "ConnectionStrings:blobs")]
    [InlineData("DataShards:Container", "Bad_Name", "DataShards:Container")]
    [InlineData("DataShards:BlockBytes", "12", "DataShards:BlockBytes")]
    public async Task ABadStorageSettingStopsTheServiceAtStartNamingTheKey(string key, string value, string named)
    {
        var settings = new Dictionary<string, string?> { ["ConnectionStrings:blobs"] = "UseDevelopmentStorage=true", [key] = value };
        var e = await Assert.ThrowsAnyAsync<Exception>(() => ServiceHost.StartAsync(settings));
        Assert.Contains(named, e.Message);
        Assert.DoesNotContain("not-base64", e.Message); // a connection string's secrets never reach a log
    }

    [Fact]
    public async Task AnEmptyRootWithoutBlobStorageStopsTheServiceAtStart()
    {
        var e = await Assert.ThrowsAnyAsync<Exception>(() => ServiceHost.StartAsync(new Dictionary<string, string?> { ["DataShards:Root"] = " " }));
        Assert.Contains("DataShards:Root", e.Message);
    }
}
