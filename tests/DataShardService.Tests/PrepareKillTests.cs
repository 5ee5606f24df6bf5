// SIGKILL of a real `prepare` process at points in every stage, on both stores: rerunning finishes the dataset
// byte for byte as an uninterrupted run writes it (no document lost or packed twice) and leaves no leftovers.
using System.Security.Cryptography;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class FolderPrepareKillTests(FolderBackend backend) : PrepareKillBehaviour(backend), IClassFixture<FolderBackend>
{
    [Fact]
    public async Task AManifestWriteCutShortLeavesNoManifestAndTheRerunCompletesIt()
    {
        // What a kill inside FolderDatasetStore.PutTextAsync leaves: a partial temporary file beside the target.
        var store = (FolderTestStore)backend.NewStore();
        var first = await PrepareProcess.RunAsync(store.Settings, Args(store));
        Assert.True(first.ExitCode == 0, first.Output);
        string datasetId = DatasetIdOf(await store.ListAsync());
        string manifest = Path.Combine(store.Root, datasetId, DatasetManifest.FileName);
        byte[] whole = await File.ReadAllBytesAsync(manifest);
        File.Delete(manifest);
        await File.WriteAllBytesAsync(manifest + ".incomplete-" + Guid.NewGuid().ToString("N"), whole[..(whole.Length / 2)]);

        var rerun = await PrepareProcess.RunAsync(store.Settings, Args(store));
        Assert.True(rerun.ExitCode == 0, rerun.Output);
        Assert.Contains("done: " + datasetId, rerun.Output);
        Assert.Equal(whole, await File.ReadAllBytesAsync(manifest));
        Assert.DoesNotContain(await store.ListAsync(), p => p.Contains(".incomplete-", StringComparison.Ordinal));
    }
}

public sealed class AbandonedStagingTests
{
    [Fact]
    public async Task APrepareRemovesStagingFoldersOfEndedProcessesAndLeavesThoseOfLiveOnes()
    {
        string root = TestCorpus.NewFolder("staging-store");
        string work = TestCorpus.NewFolder("staging-work");
        string input = TestCorpus.WritePlain(TestCorpus.NewFolder("staging-input"), "bible.txt", TestCorpus.FirstChapters(10));
        using (var ended = System.Diagnostics.Process.Start("true")!)
        {
            await ended.WaitForExitAsync();
            Directory.CreateDirectory(Path.Combine(work, $"ds-00000000000000aa-{ended.Id}-{Guid.NewGuid():N}", "x"));
        }
        // This process is alive and may be preparing another dataset right now: its folder stays.
        string live = Directory.CreateDirectory(Path.Combine(work, $"ds-00000000000000bb-{Environment.ProcessId}-{Guid.NewGuid():N}")).FullName;

        var preparer = new DatasetPreparer(new Storage.FolderDatasetStore(root), work);
        await preparer.PrepareAsync(new PrepareSpec([new SourceSpec("bible", input)], 32, 259), null, CancellationToken.None);
        Assert.Equal([live], Directory.GetDirectories(work));
        Directory.Delete(root, true);
        Directory.Delete(work, true);
        Directory.Delete(Path.GetDirectoryName(input)!, true);
    }
}

public sealed class AzuritePrepareKillTests(AzuriteBackend backend) : PrepareKillBehaviour(backend), IClassFixture<AzuriteBackend>;

public abstract class PrepareKillBehaviour(StoreBackend backend)
{
    private static readonly Lazy<string> Input = new(() =>
    {
        // 600 chapters in three files, about 2 MB: long enough that each stage outlives the reaction to its line.
        string folder = TestCorpus.NewFolder("kill-input");
        var chapters = Text.Data.ShippedCorpus.Documents().Take(600).ToArray();
        for (int f = 0; f < 3; f++)
            TestCorpus.WritePlain(folder, $"part-{f}.txt", chapters.Skip(200 * f).Take(200));
        return folder;
    });

    protected static string[] Args(TestStore store)
    {
        var args = new List<string> { "--source", $"kjv={Input.Value}", "--seq-len", "64", "--vocab-size", "512", "--samples-per-shard", "1500" };
        if (store is FolderTestStore folder)
            args.AddRange(["--out", folder.Root]);
        return [.. args];
    }

    protected static string DatasetIdOf(IEnumerable<string> paths) => paths.Select(p => p.Split('/')[0]).Distinct().Single();

    [Fact]
    public async Task APrepareKilledInEachStageAndRerunEndsWithTheDatasetAnUninterruptedRunWrites()
    {
        var reference = backend.NewStore();
        var uninterrupted = await PrepareProcess.RunAsync(reference.Settings, Args(reference));
        Assert.True(uninterrupted.ExitCode == 0, uninterrupted.Output);
        var expected = await ContentsAsync(reference);
        string datasetId = DatasetIdOf(expected.Keys);
        Assert.Contains($"{datasetId}/{DatasetManifest.FileName}", expected.Keys);
        Assert.True(expected.Keys.Count(p => p.EndsWith(".bin", StringComparison.Ordinal)) >= 4, string.Join(", ", expected.Keys));

        // One store, killed again and again: each rerun starts from whatever the previous kill left.
        var store = backend.NewStore();
        string workDir = store.Settings["DataShards:WorkDir"]!;
        var killPoints = new (string Stage, Func<string, bool> At)[]
        {
            ("while reading and cleaning", l => l.Contains("clean+dedup: reading", StringComparison.Ordinal)),
            ("while training the tokenizer", l => l.Contains("tokenizer: training", StringComparison.Ordinal)),
            ("between shard puts", l => l.Contains("shard train-00001.bin", StringComparison.Ordinal)),
            ("after the last shard, around the manifest write", l => l.StartsWith("[prepare] tokenize+pack:", StringComparison.Ordinal) && l.EndsWith("(done)", StringComparison.Ordinal)),
        };
        foreach (var (stage, at) in killPoints)
        {
            var run = await PrepareProcess.RunAsync(store.Settings, Args(store), at);
            var left = await store.ListAsync();
            if (run.Killed)
            {
                Assert.DoesNotContain($"{datasetId}/{DatasetManifest.FileName}", left); // the manifest marks a finished dataset, so it is last
                Assert.True(Directory.EnumerateFileSystemEntries(workDir).Any(), $"killed {stage}: the staging folder was the process's to remove");
            }
            else
            {
                // Only the last point can lose the race (the process is that close to its end): then it finished whole.
                Assert.True(run.ExitCode == 0 && stage.StartsWith("after the last shard", StringComparison.Ordinal), $"{stage}: exit code {run.ExitCode}: {run.Output}");
            }
            // Whatever a kill left in the store is part of the finished dataset, byte for byte, or a leftover the rerun removes.
            foreach (string path in left.Where(expected.ContainsKey))
                Assert.Equal(expected[path], Sha(await store.ReadAsync(path)));
        }

        var final = await PrepareProcess.RunAsync(store.Settings, Args(store));
        Assert.True(final.ExitCode == 0, final.Output);
        Assert.Equal(expected, await ContentsAsync(store));
        Assert.Empty(Directory.EnumerateFileSystemEntries(workDir)); // the killed runs' staging folders are gone too
        await reference.DeleteAsync();
        await store.DeleteAsync();
    }

    private static async Task<Dictionary<string, string>> ContentsAsync(TestStore store)
    {
        var contents = new Dictionary<string, string>();
        foreach (string path in await store.ListAsync())
            contents[path] = Sha(await store.ReadAsync(path));
        return contents;
    }

    private static string Sha(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));
}
