// The `prepare` verb of the real DataShardService executable, as a child process: blob storage when
// ConnectionStrings__blobs is set (as the service chooses), and the dataset it writes is served by the service.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class PrepareCliTests(AzuriteBackend backend) : IClassFixture<AzuriteBackend>
{
    [Fact]
    public async Task PrepareWritesToBlobStorageWhenTheConnectionStringIsSetAndTheServiceServesIt()
    {
        string input = TestCorpus.NewFolder("cli-input");
        string file = TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(20));
        var store = (AzuriteTestStore)backend.NewStore();

        var (code, output) = await RunPrepareAsync(store.Settings,
            "--source", $"bible={file}", "--seq-len", "32", "--vocab-size", "259", "--samples-per-shard", "200");
        Assert.True(code == 0, output);

        var blobs = await store.ListAsync();
        string manifestPath = Assert.Single(blobs, b => b.EndsWith("/manifest.json", StringComparison.Ordinal));
        string datasetId = manifestPath[..manifestPath.IndexOf('/')];
        Assert.Contains($"{datasetId}/tokenizer.json", blobs);
        Assert.Contains($"{datasetId}/train-00000.bin", blobs);
        Assert.Contains($"done: {datasetId} at http://127.0.0.1:", output); // it says where, and that is the blob endpoint

        // The service on the same container serves what the CLI wrote, samples included.
        await using var host = await ServiceHost.StartAsync(store);
        var manifest = await host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = datasetId });
        Assert.True(manifest.TrainSamples > 0);
        using var call = host.Client.GetBatch(new GetBatchRequest { DatasetId = datasetId, Seed = 1, Start = 0, Count = 4 });
        int served = 0;
        while (await call.ResponseStream.MoveNext(CancellationToken.None))
        {
            Assert.Equal(33, call.ResponseStream.Current.Tokens.Count);
            served++;
        }
        Assert.Equal(4, served);
        Directory.Delete(input, recursive: true);
    }

    [Theory]
    [InlineData(new[] { "--out", "x", "--seq-len", "32" }, "At least one --source")]
    [InlineData(new[] { "--source", "a=a.txt", "--out", "x" }, "--seq-len N is required")]
    [InlineData(new[] { "--source", "a=a.txt", "--seq-len", "long" }, "--seq-len 'long' is not an integer")]
    [InlineData(new[] { "--source", "a=a.txt", "--seq-len", "32", "--shards" }, "Unknown argument '--shards'")]
    public void ArgumentsThatCannotMakeASpecAreRefusedNamingTheOption(string[] args, string expected)
    {
        var e = Assert.Throws<FormatException>(() => DeepSeekCluster.DataShardService.Serving.PrepareCli.Parse(args));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public async Task AnOutFolderTogetherWithTheConnectionStringIsRefusedAndWritesNothing()
    {
        string input = TestCorpus.NewFolder("cli-input");
        string file = TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(3));
        string outDir = Path.Combine(input, "out");
        var store = (AzuriteTestStore)backend.NewStore();

        var (code, output) = await RunPrepareAsync(store.Settings, "--source", $"bible={file}", "--seq-len", "32", "--out", outDir);
        Assert.Equal(2, code);
        Assert.Contains("ConnectionStrings:blobs is set", output);
        Assert.Contains(outDir, output);
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(await store.ListAsync());
        Directory.Delete(input, recursive: true);
    }

    private static async Task<(int Code, string Output)> RunPrepareAsync(IReadOnlyDictionary<string, string?> settings, params string[] args)
    {
        var run = await PrepareProcess.RunAsync(settings, args);
        return (run.ExitCode, run.Output);
    }
}

public sealed class PrepareCliProgressTests
{
    [Fact]
    public async Task EachStageReportsDocumentsMegabytesAndMegabytesPerSecond()
    {
        string input = TestCorpus.NewFolder("cli-progress");
        string store = TestCorpus.NewFolder("cli-progress-store");
        string file = TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(40));
        var run = await PrepareProcess.RunAsync(new Dictionary<string, string?> { ["DataShards:WorkDir"] = store + "-work" },
            ["--source", $"bible={file}", "--seq-len", "32", "--vocab-size", "300", "--samples-per-shard", "500", "--out", store]);
        Assert.True(run.ExitCode == 0, run.Output);

        var stageLine = new System.Text.RegularExpressions.Regex(
            @"^\[prepare\] (?<stage>clean\+dedup|tokenizer|tokenize\+pack): (?<docs>\d+) documents, (?<mb>\d+\.\d) MB in \d+\.\d s \((?<rate>\d+\.\d) MB/s\).*\(done\)$");
        var done = run.Lines.Select(l => stageLine.Match(l)).Where(m => m.Success).ToDictionary(m => m.Groups["stage"].Value);
        Assert.Equal(new[] { "clean+dedup", "tokenizer", "tokenize+pack" }.Order(StringComparer.Ordinal), done.Keys.Order(StringComparer.Ordinal));
        Assert.Equal("40", done["clean+dedup"].Groups["docs"].Value);   // every chapter read
        Assert.Equal("40", done["tokenize+pack"].Groups["docs"].Value); // every kept chapter packed
        Assert.All(done.Values, m => Assert.True(double.Parse(m.Groups["mb"].Value, System.Globalization.CultureInfo.InvariantCulture) > 0, m.Value));
        Assert.Contains(run.Lines, l => l.StartsWith("[prepare] clean+dedup: reading 1 files", StringComparison.Ordinal));
        Assert.Contains(run.Lines, l => l.StartsWith("[prepare] tokenizer: training vocab 300", StringComparison.Ordinal));
        Directory.Delete(input, true);
        Directory.Delete(store, true);
        Directory.Delete(store + "-work", true);
    }
}
