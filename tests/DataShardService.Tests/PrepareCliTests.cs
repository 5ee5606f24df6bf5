// The `prepare` verb of the real DataShardService executable, as a child process: blob storage when
// ConnectionStrings__blobs is set (as the service chooses), and the dataset it writes is served by the service.
using System.Diagnostics;
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

    // Settings become environment variables the way the service reads them ("DataShards:Container" → DataShards__Container).
    private static async Task<(int Code, string Output)> RunPrepareAsync(IReadOnlyDictionary<string, string?> settings, params string[] args)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "DeepSeekCluster.DataShardService.dll");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.ArgumentList.Add(dll);
        start.ArgumentList.Add("prepare");
        foreach (string a in args) start.ArgumentList.Add(a);
        foreach (var (key, value) in settings) start.Environment[key.Replace(":", "__", StringComparison.Ordinal)] = value;
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var deadline = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        await process.WaitForExitAsync(deadline.Token);
        return (process.ExitCode, await stdout + await stderr);
    }
}
