// One server shared by the API tests: versions v1 (seed 1) and v2 (seed 2), route "deepseek" → v1.
using System.Diagnostics;
using System.Text.Json;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.ModelServer.Tests;

public sealed class ServerFixture : IAsyncLifetime
{
    public ServerHost Server { get; private set; } = null!;
    public string V1 => ModelFolders.Get(1);
    public string V2 => ModelFolders.Get(2);

    public async Task InitializeAsync() => Server = await ServerHost.StartAsync(new Dictionary<string, string?>
    {
        ["Serving:Models:0:Version"] = "v1", ["Serving:Models:0:Path"] = V1,
        ["Serving:Models:1:Version"] = "v2", ["Serving:Models:1:Path"] = V2,
        ["Serving:Routes:deepseek:v1"] = "1",
        ["Serving:MaxBatch"] = "16", ["Serving:BlockSize"] = "8",
    });

    public async Task DisposeAsync() => await Server.DisposeAsync();

    /// <summary>What TextGenerator produces alone for this prompt text on a folder (the tokenizer's EOS stops it).</summary>
    public static (int[] Ids, string Text, int PromptTokens) Alone(string folder, string prompt, SamplingOptions sampling)
    {
        var loaded = HfModelFolder.Load(folder);
        using var model = loaded.Model;
        var tokenizer = loaded.Tokenizer!;
        var ids = tokenizer.Encode(prompt, addSpecialTokens: true);
        var generated = TextGenerator.Generate(model, ids, sampling with { EosTokenId = tokenizer.EosTokenId });
        return (generated, tokenizer.Decode(generated), ids.Length);
    }

    public static BpeTokenizer Tokenizer(string folder) => BpeTokenizer.Load(Path.Combine(folder, HfModelFolder.TokenizerFile));

    /// <summary>`gpu-worker generate --json` as a user runs it: its own process on the folder.</summary>
    public static (long[] Ids, string Text) GpuWorkerGenerate(string folder, string prompt, int maxNewTokens)
    {
        var dll = Path.Combine(AppContext.BaseDirectory, "gpu-worker.dll");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { dll, "generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", maxNewTokens.ToString(), "--greedy", "--json", "--device", "cpu" })
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(3))) { p.Kill(true); throw new TimeoutException("gpu-worker generate did not finish"); }
        Assert.True(p.ExitCode == 0, stderr.Result);
        using var json = JsonDocument.Parse(stdout.Result);
        return (json.RootElement.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray(),
                json.RootElement.GetProperty("text").GetString()!);
    }
}
