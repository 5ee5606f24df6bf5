// Prepare through the real gRPC service: dedup, mixture, interruption and rerun, corrupt shards.
using System.Text.Json;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class PrepareTests
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

        string store = TestCorpus.NewFolder("store");
        await using var host = await ServiceHost.StartAsync(store);
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
        Directory.Delete(store, true);
    }

    [Fact]
    public void TheFirstOfTwoDuplicatesIsKept()
    {
        var chapters = TestCorpus.FirstChapters(3);
        var dedup = new Deduplicator(new DedupSpec());
        string near = TestCorpus.ChangeWords(chapters[0], every: 100);
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[0], Deduplicator.TextHash(chapters[0])));
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[1], Deduplicator.TextHash(chapters[1])));
        Assert.Equal(DedupVerdict.ExactDuplicate, dedup.Check(chapters[0], Deduplicator.TextHash(chapters[0])));
        Assert.Equal(DedupVerdict.NearDuplicate, dedup.Check(near, Deduplicator.TextHash(near)));
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[2], Deduplicator.TextHash(chapters[2])));
    }

    [Fact]
    public async Task APrepareKilledAfterTwoShardsAndRerunGivesTheSameManifestAsAnUninterruptedRun()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(60));
        var request = TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input });

        string interruptedStore = TestCorpus.NewFolder("interrupted");
        string datasetId;
        await using (var host = await ServiceHost.StartAsync(interruptedStore))
        {
            int stored = 0;
            host.Hooks.ShardStored = _ => { if (++stored == 2) throw new IOException("killed by the test after 2 shards"); };
            await Assert.ThrowsAsync<RpcException>(async () => await host.Client.PrepareAsync(request));
            datasetId = Directory.GetDirectories(interruptedStore).Select(Path.GetFileName).Single()!;
            Assert.False(File.Exists(Path.Combine(interruptedStore, datasetId, DatasetManifest.FileName)));
            Assert.Equal(2, Directory.GetFiles(Path.Combine(interruptedStore, datasetId), "*.bin").Length);

            host.Hooks.ShardStored = null;
            var rerun = await host.Client.PrepareAsync(request);
            Assert.False(rerun.Reused);
            Assert.Equal(datasetId, rerun.DatasetId);
        }

        string cleanStore = TestCorpus.NewFolder("clean");
        await using (var host = await ServiceHost.StartAsync(cleanStore))
            Assert.Equal(datasetId, (await host.Client.PrepareAsync(request)).DatasetId);

        string Manifest(string store) => File.ReadAllText(Path.Combine(store, datasetId, DatasetManifest.FileName));
        Assert.Equal(Manifest(cleanStore), Manifest(interruptedStore));
        var shards = DatasetManifest.FromJson(Manifest(cleanStore), "test").Splits.Values.SelectMany(s => s.Shards).ToList();
        Assert.True(shards.Count > 2);
        var filesLeft = Directory.GetFiles(Path.Combine(interruptedStore, datasetId)).Select(f => Path.GetFileName(f)!).Order().ToList();
        Assert.Equal(shards.Select(s => s.Path).Append("manifest.json").Append("tokenizer.json").Order().ToList(), filesLeft);
        foreach (var store in new[] { input, interruptedStore, cleanStore })
            Directory.Delete(store, true);
    }

    [Fact]
    public async Task ACorruptShardIsRefusedWithAnErrorNamingIt()
    {
        string input = TestCorpus.NewFolder("input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(30));
        string store = TestCorpus.NewFolder("store");
        await using var host = await ServiceHost.StartAsync(store);
        var reply = await host.Client.PrepareAsync(TestCorpus.Request(32, 300, 300, new Source { Name = "bible", Path = input }));

        string shard = Path.Combine(store, reply.DatasetId, "train-00001.bin");
        var bytes = File.ReadAllBytes(shard);
        bytes[100] ^= 0x01;
        File.WriteAllBytes(shard, bytes);

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
        }
        Directory.Delete(input, true);
        Directory.Delete(store, true);
    }

    [Fact]
    public void TheReportSerializesEveryCleaningCounter()
    {
        var json = JsonSerializer.Serialize(new CleaningCounts(), DatasetManifest.Json);
        foreach (var key in new[] { "removed_too_short", "removed_too_long", "removed_low_alphabetic", "removed_repeated_lines", "control_characters_removed", "nfc_changed" })
            Assert.Contains(key, json);
    }
}
