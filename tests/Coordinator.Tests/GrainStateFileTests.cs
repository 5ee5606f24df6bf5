// The Coordinator's file grain storage: a write replaces a state file whole, a replacement cut off by a kill is swept at
// the next start, and a state folder written by Orleans' own FileGrainStorage reads unchanged.
using DeepSeekCluster.Coordinator.Storage;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using Orleans.Persistence.FileStorage;
using Orleans.Providers;
using Orleans.Serialization.Serializers;
using Orleans.Storage;
using Xunit.Abstractions;

namespace DeepSeekCluster.Coordinator.Tests;

public class GrainStateFileTests(ITestOutputHelper output)
{
    /// <summary>A state that says whether it arrived whole: [n, n copies of one letter] (a system type: Orleans' JSON reads it back).</summary>
    static List<string> Filler(int length, char letter) => [length.ToString(), new string(letter, length)];

    static readonly GrainId Grain = GrainId.Create("filler", "one");
    const string StateName = "filler";

    static IGrainStorage StorageOf(GrainCluster c) => c.SiloServices.GetRequiredKeyedService<IGrainStorage>(ProviderConstants.DEFAULT_STORAGE_PROVIDER_NAME);

    /// <summary>
    /// A SIGKILL freezes a state file as it is at that instant, and a reader racing the writer sees exactly those instants.
    /// Writing in place (truncate, then write after a thread-pool hop, as Orleans' FileGrainStorage does) shows the reader
    /// empty and partial records within a second of writes; replacing the file whole never does.
    /// </summary>
    [Fact]
    public async Task AReaderRacingTheWritesOfAGrainStateOnlyEverSeesAWholeRecord()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var storage = StorageOf(c);
        var written = new GrainState<List<string>>(Filler(0, 'a'));
        await storage.WriteStateAsync(StateName, Grain, written);
        using var writing = new CancellationTokenSource();
        int writes = 0, reads = 0;
        var writer = Task.Run(async () =>
        {
            // For a while rather than a count: in place, a write takes well under a millisecond; replaced, an fsync's worth.
            var racing = System.Diagnostics.Stopwatch.StartNew();
            for (; racing.Elapsed < TimeSpan.FromSeconds(1) || writes < 50; writes++)
            {
                int length = 20_000 + writes % 1000; // ~20 KB: a job's state with its events and ledger is that size
                written.State = Filler(length, (char)('a' + writes % 26));
                await storage.WriteStateAsync(StateName, Grain, written);
            }
            writing.Cancel();
        });
        var torn = new List<string>();
        while (!writing.IsCancellationRequested && torn.Count == 0)
        {
            var read = new GrainState<List<string>>();
            try
            {
                await storage.ReadStateAsync(StateName, Grain, read);
                var f = read.State!;
                if (f.Count != 2 || f[1].Length.ToString() != f[0] || f[1].Distinct().Count() > 1) torn.Add($"a state [{f.FirstOrDefault()}, {f.Skip(1).FirstOrDefault()?.Length} characters]");
                reads++;
            }
            catch (Exception e) when (e is InvalidDataException or Newtonsoft.Json.JsonException or IOException)
            {
                torn.Add($"{e.GetType().Name}: {e.Message}");
            }
        }
        await writer.WaitAsync(TimeSpan.FromMinutes(1));
        Assert.True(torn.Count == 0, $"after {writes} writes and {reads} whole reads, a reader saw a torn record: {torn.FirstOrDefault()}");
        Assert.True(reads > 10, $"only {reads} reads raced {writes} writes: the race was not exercised");
        output.WriteLine($"{writes} writes raced by {reads} whole reads");
    }

    [Fact]
    public async Task AReplacementCutOffByAKillIsSweptAtStartAndAStateOfOrleansFileStorageReadsUnchanged()
    {
        string folder = TestSpecs.TempFolder();
        string grains = Path.Combine(folder, "grains");
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            // The layout this storage promises to read: Orleans' own FileGrainStorage, writing into the same folder.
            var orleans = new FileGrainStorage(ProviderConstants.DEFAULT_STORAGE_PROVIDER_NAME,
                new FileGrainStorageOptions { RootDirectory = grains, GrainStorageSerializer = c.SiloServices.GetRequiredService<IGrainStorageSerializer>() },
                c.SiloServices.GetRequiredService<IOptions<ClusterOptions>>(), c.SiloServices.GetRequiredService<IActivatorProvider>());
            await orleans.WriteStateAsync(StateName, Grain, new GrainState<List<string>>(Filler(3, 'c')));
        }
        string record = Assert.Single(Directory.GetFiles(grains, "*.grain"));
        string cutOff = record + ".0123456789abcdef0123456789abcdef.writing";
        await File.WriteAllBytesAsync(cutOff, "ORLFS0"u8.ToArray()); // what a kill in the middle of a replacement leaves

        await using (var c = await GrainCluster.StartAsync(folder))
        {
            Assert.False(File.Exists(cutOff), $"the cut-off replacement {Path.GetFileName(cutOff)} is still there after a start");
            var read = new GrainState<List<string>>();
            await StorageOf(c).ReadStateAsync(StateName, Grain, read);
            Assert.True(read.RecordExists, "the state written by Orleans' FileGrainStorage was not found");
            Assert.Equal(Filler(3, 'c'), read.State);
            // And it goes on from there: the ETag that storage wrote is the one this one checks.
            read.State = Filler(1, 'z');
            await StorageOf(c).WriteStateAsync(StateName, Grain, read);
            Assert.IsType<AtomicFileGrainStorage>(StorageOf(c));
        }
    }
}
