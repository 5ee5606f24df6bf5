// Prepare through the real gRPC service, on both backends: dedup, mixture, interruption and rerun, corrupt shards.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class FolderPrepareTests(FolderBackend backend) : PrepareBehaviour(backend), IClassFixture<FolderBackend>;

public sealed class AzuritePrepareTests(AzuriteBackend backend) : PrepareBehaviour(backend), IClassFixture<AzuriteBackend>;

public abstract class PrepareBehaviour(StoreBackend backend)
{
    [Fact]
    public async Task DedupRemovesPlantedNearAndExactCopiesAndKeepsDistinctDocuments()
    {
        var chapters = TestCorpus.FirstChapters(62);
        string bible = TestCorpus.NewFolder("bible");
        string web = TestCorpus.NewFolder("web");
        TestCorpus.WritePlain(bible, "bible.txt", chapters.Take(60));
        // The second source repeats chapters of the first: 5 with a word in 100 changed, 3 verbatim, 2 new ones.
        var webDocs = Enumerable.Range(0, 5).Select(i => TestCorpus.ChangeWords(chapters[3 * i], every: 100))
            .Concat(chapters.Skip(20).Take(3))
            .Concat(chapters.Skip(60));
        TestCorpus.WriteJsonLinesGz(web, "crawl.jsonl.gz", "content", webDocs);

        await using var host = await ServiceHost.StartAsync(backend.NewStore());
        using var metrics = new MetricRecorder(host);
        var reply = await host.Client.PrepareAsync(TestCorpus.Request(32, 300, 4000,
            new Source { Name = "bible", Path = bible },
            new Source { Name = "web", Path = web, TextField = "content", Weight = 2 }));

        var manifest = DatasetManifest.FromJson(
            (await host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = reply.DatasetId })).ManifestJson, "test");
        Assert.Equal(3, manifest.Report.Dedup.RemovedExact);
        Assert.Equal(5, manifest.Report.Dedup.RemovedNear);
        Assert.Equal(62, manifest.Report.Dedup.Kept);
        // The first occurrence wins: all 60 bible chapters stay, the web source keeps only its 2 new ones.
        Assert.Equal(60, manifest.Sources[0].DocumentsAfterDedup);
        Assert.Equal(2, manifest.Sources[1].DocumentsAfterDedup);
        Assert.Equal(4, manifest.Sources[1].DocumentsInMix); // weight 2: each kept document twice
        Assert.Equal(64, manifest.Report.DocumentsPacked);
        Assert.Equal(10, manifest.Sources[1].DocumentsRead);
        Assert.True(manifest.Report.RawBytes > 0);
        Assert.Equal(manifest.Report.RawBytes, metrics.Sum("deepseek.data.prepared_bytes"));
        Assert.True(metrics.Last("deepseek.data.prepare_megabytes_per_second") > 0);
        Directory.Delete(bible, true);
        Directory.Delete(web, true);
    }

    [Fact]
    public async Task APrepareKilledAfterTwoShardsAndRerunGivesTheSameManifestAsAnUninterruptedRun()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(60));
        var request = TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input });

        var interruptedStore = backend.NewStore();
        string datasetId;
        await using (var host = await ServiceHost.StartAsync(interruptedStore))
        {
            int stored = 0;
            host.Hooks.ShardStored = _ => { if (++stored == 2) throw new IOException("killed by the test after 2 shards"); };
            await Assert.ThrowsAsync<RpcException>(async () => await host.Client.PrepareAsync(request));
            var left = await interruptedStore.ListAsync();
            datasetId = left.Select(p => p.Split('/')[0]).Distinct().Single();
            Assert.DoesNotContain($"{datasetId}/{DatasetManifest.FileName}", left);
            Assert.Equal(2, left.Count(p => p.EndsWith(".bin", StringComparison.Ordinal)));

            host.Hooks.ShardStored = null;
            var rerun = await host.Client.PrepareAsync(request);
            Assert.False(rerun.Reused);
            Assert.Equal(datasetId, rerun.DatasetId);
        }

        var cleanStore = backend.NewStore();
        await using (var host = await ServiceHost.StartAsync(cleanStore))
            Assert.Equal(datasetId, (await host.Client.PrepareAsync(request)).DatasetId);

        string manifestPath = $"{datasetId}/{DatasetManifest.FileName}";
        Assert.Equal(await cleanStore.ReadAsync(manifestPath), await interruptedStore.ReadAsync(manifestPath));
        var manifest = DatasetManifest.FromJson(System.Text.Encoding.UTF8.GetString(await cleanStore.ReadAsync(manifestPath)), "test");
        var shards = manifest.Splits.Values.SelectMany(s => s.Shards).ToList();
        Assert.True(shards.Count > 2);
        var expected = shards.Select(s => s.Path).Append("manifest.json").Append("tokenizer.json")
            .Select(p => $"{datasetId}/{p}").Order(StringComparer.Ordinal).ToList();
        Assert.Equal(expected, await interruptedStore.ListAsync());
        Directory.Delete(input, true);
    }

    [Fact]
    public async Task ACorruptShardIsRefusedWithAnErrorNamingIt()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(30));
        var store = backend.NewStore();
        await using var host = await ServiceHost.StartAsync(store);
        var reply = await host.Client.PrepareAsync(TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input }));

        string shard = $"{reply.DatasetId}/train-00001.bin";
        var bytes = await store.ReadAsync(shard);
        bytes[100] ^= 0x01;
        await store.WriteAsync(shard, bytes);

        for (int attempt = 0; attempt < 2; attempt++) // refused every time, not only the first
        {
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
            {
                using var call = host.Client.GetBatch(new GetBatchRequest
                    { DatasetId = reply.DatasetId, Seed = 7, Start = 0, Count = (int)reply.TrainSamples });
                await foreach (var _ in call.ResponseStream.ReadAllAsync()) { }
            });
            Assert.Equal(StatusCode.DataLoss, e.StatusCode);
            Assert.Contains("train-00001.bin", e.Status.Detail);
            Assert.Contains("corrupt", e.Status.Detail);
        }
        Directory.Delete(input, true);
    }
}
