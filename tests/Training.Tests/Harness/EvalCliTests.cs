// `gpu-worker eval` as a user runs it: a real process scores a model folder and writes the harness's JSON; bad input
// exits 2 naming what was wrong.
using System.Text.Json;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Harness;

public class EvalCliTests
{
    static (int code, string stdout, string stderr) Run(params string[] args) => GpuWorkerCliTests.RunWith("dotnet", new Dictionary<string, string>(), args);

    [Fact]
    public void EvalScoresAModelFolderAndRefusesBadInputNamingIt()
    {
        var dir = Directory.CreateTempSubdirectory("cli-eval-").FullName;
        try
        {
            var tokenizer = BpeTokenizer.Train(ShippedCorpus.Documents().Take(20), 300);
            manual_seed(2);
            using var model = new DeepSeekForCausalLM(DeepSeekConfig.Tiny(tokenizer.VocabSize) with { NumHiddenLayers = 2, HiddenSize = 64 }).InitializeWeights();
            HfModelFolder.Save(Path.Combine(dir, "model"), model, tokenizer);
            var results = Path.Combine(dir, "results.json");
            var (code, stdout, stderr) = Run("eval", "--model", Path.Combine(dir, "model"), "--tasks", "kjv_nextverse,kjv_cloze", "--limit", "3",
                                             "--max-length", "512", "--device", "cpu", "--out", results);
            Assert.True(code == 0, stderr + stdout);
            Assert.Contains("kjv_nextverse    acc", stdout);
            using var json = JsonDocument.Parse(File.ReadAllText(results));
            Assert.Equal(3, json.RootElement.GetProperty("n-samples").GetProperty("kjv_cloze").GetProperty("effective").GetInt32());

            (code, _, stderr) = Run("eval", "--model", Path.Combine(dir, "model"), "--tasks", "nope");
            Assert.Equal(2, code);
            Assert.Contains("unknown task 'nope'", stderr);
            (code, _, stderr) = Run("eval", "--model", Path.Combine(dir, "missing"), "--tasks", "kjv_cloze");
            Assert.Equal(2, code);
            Assert.Contains($"Model folder '{Path.Combine(dir, "missing")}' does not exist", stderr);
        }
        finally { Directory.Delete(dir, true); }
    }
}
