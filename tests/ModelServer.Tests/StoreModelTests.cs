// Models from the real CheckpointStore service (folder backend): an export and a committed checkpoint, at start and via /admin.
using System.Net;
using System.Net.Http.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.ModelServer.Tests;

public sealed class StoreModelTests : IAsyncLifetime
{
    const string Job = "served";
    const long Step = 12;
    StoreHost store = null!;
    readonly string scratch = Directory.CreateTempSubdirectory("model-server-store-").FullName;
    readonly string folder = ModelFolders.Get(1);

    public async Task InitializeAsync()
    {
        store = await StoreHost.StartAsync();
        // The tests' model folder as a committed checkpoint of job 'served' (two data-parallel ranks), and its hf export.
        var loaded = HfModelFolder.Load(folder);
        using var model = loaded.Model;
        var checkpoints = new GrpcCheckpointStore(store.Client, store.Address, Job, Path.Combine(scratch, "staging"));
        await ShardedCheckpointWriter.SaveAllRanksAsync(checkpoints, Job, ParallelLayout.Even(2, 1, model.Config.NumHiddenLayers),
            CheckpointTensors.Collect(model, null), new CheckpointPosition(Step, 1, 0, Step), model.Config.ToJson(), loaded.Tokenizer!.Hash);
        var (exported, manifest) = await ModelExport.FromCheckpointAsync(checkpoints, Step, loaded.Tokenizer, "hf", Path.Combine(scratch, "local"));
        await new GrpcExportStore(new ExportStore.ExportStoreClient(store.Channel), store.Address).UploadAsync(exported, manifest);
    }

    public async Task DisposeAsync()
    {
        await store.DisposeAsync();
        Directory.Delete(scratch, recursive: true);
    }

    static async Task<long[]> Greedy(ServerHost server, string version, int[] prompt)
    {
        var answer = await server.CompleteAsync(new JsonObject
        {
            ["model"] = version, ["prompt"] = new JsonArray(prompt.Select(t => (JsonNode)t).ToArray()), ["max_tokens"] = 8,
            ["temperature"] = 0, ["return_token_ids"] = true,
        });
        return answer["choices"]![0]!["token_ids"]!.AsArray().Select(t => (long)t!).ToArray();
    }

    [Fact]
    public async Task AnExportAndACheckpointInTheStoreServeWhatTheFolderGeneratesAndAdminLoadsFromTheStore()
    {
        string cache = Path.Combine(scratch, "cache");
        await using var server = await ServerHost.StartAsync(new Dictionary<string, string?>
        {
            ["Serving:Store"] = store.Address, ["Serving:ModelCache"] = cache,
            ["Serving:Models:0:Version"] = "exported", ["Serving:Models:0:Store"] = $"exports/{Job}/{Step}/hf",
            ["Serving:Models:1:Version"] = "checkpoint", ["Serving:Models:1:Store"] = $"{Job}/{Step}",
            ["Serving:Models:1:Tokenizer"] = Path.Combine(folder, "tokenizer.json"),
        });
        int[] prompt = [5, 17, 42, 9, 100];
        using var model = HfModelFolder.Load(folder).Model;
        var alone = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 8 }).Select(t => (long)t).ToArray();
        Assert.Equal(8, alone.Length);
        Assert.Equal(alone, await Greedy(server, "exported", prompt));
        Assert.Equal(alone, await Greedy(server, "checkpoint", prompt));
        string cachedExport = ModelExport.FolderOf(Path.Combine(cache, "exports"), Job, Step, "hf");
        Assert.Equal(Job, ModelExport.Verify(cachedExport).Job);

        // /admin/models loads from the store too. A damaged file in the cache is caught by its hash and fetched again.
        var weights = Directory.GetFiles(cachedExport, "*.safetensors").First();
        var original = await File.ReadAllBytesAsync(weights);
        var damaged = (byte[])original.Clone();
        damaged[^1] ^= 0xFF;
        await File.WriteAllBytesAsync(weights, damaged);
        using var admin = new HttpClient { BaseAddress = new Uri(server.Url) };
        admin.DefaultRequestHeaders.Authorization = new("Bearer", ServerHost.ClusterToken);
        var load = await admin.PostAsJsonAsync("/admin/models", new { version = "reloaded", store = $"exports/{Job}/{Step}/hf" });
        Assert.Equal(HttpStatusCode.Created, load.StatusCode);
        Assert.Equal(original, await File.ReadAllBytesAsync(weights));
        Assert.Equal(alone, await Greedy(server, "reloaded", prompt));

        // A step the store does not hold, and a format the server cannot serve, are the caller's errors, named.
        var missing = await admin.PostAsJsonAsync("/admin/models", new { version = "missing", store = $"exports/{Job}/99/hf" });
        Assert.Equal(HttpStatusCode.BadRequest, missing.StatusCode);
        Assert.Contains("exports/served/99/hf", await missing.Content.ReadAsStringAsync());
        var gguf = await admin.PostAsJsonAsync("/admin/models", new { version = "gguf", store = $"exports/{Job}/{Step}/gguf-f16" });
        Assert.Equal(HttpStatusCode.BadRequest, gguf.StatusCode);
        Assert.Contains("cannot be served", await gguf.Content.ReadAsStringAsync());
    }

    [Theory]
    [InlineData("exports/served/12", "expected exports/")]
    [InlineData("served/twelve", "step 'twelve'")]
    [InlineData("exports/served/12/onnx", "format 'onnx'")]
    [InlineData("../1", "job '..'")]
    public void AStorePlaceThatIsNotOneIsRefusedNamingTheSetting(string place, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => StoreModelRef.Parse(place, "Serving:Models:0:Store"));
        Assert.Contains("Serving:Models:0:Store", e.Message);
        Assert.Contains(expected, e.Message);
    }
}
