// Hugging Face folders for the server tests: random-initialised tiny models with a small trained tokenizer, written once.
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Tests;

public static class ModelFolders
{
    static readonly Lazy<BpeTokenizer> Tokenizer = new(() => BpeTokenizer.Train(ShippedCorpus.Documents().Take(40).ToList(), 300));
    static readonly Lazy<string> Root = new(() => Directory.CreateTempSubdirectory("model-server-tests-").FullName);
    static readonly Dictionary<(int, int), string> Written = [];

    /// <summary>
    /// Two layers (one dense, one MoE with 4 experts), vocabulary of the tokenizer, context 128. The wider init
    /// (0.1) spreads the logits so greedy choices are far from ties.
    /// </summary>
    public static DeepSeekConfig Config(int vocab, int context = 128) => DeepSeekConfig.Tiny(vocab) with
    {
        HiddenSize = 64, IntermediateSize = 128, MoeIntermediateSize = 32, NumHiddenLayers = 2, NRoutedExperts = 4, NGroup = 2,
        TopkGroup = 1, KvLoraRank = 16, QLoraRank = 32, QkNopeHeadDim = 16, QkRopeHeadDim = 8, VHeadDim = 16,
        MaxPositionEmbeddings = context, InitializerRange = 0.1, NumNextnPredictLayers = 0,
    };

    /// <summary>The folder of the model initialised from <paramref name="seed"/>, with a context of <paramref name="context"/> tokens.</summary>
    public static string Get(int seed, int context = 128)
    {
        lock (Written)
        {
            if (Written.TryGetValue((seed, context), out var dir)) return dir;
            dir = Path.Combine(Root.Value, $"seed-{seed}-context-{context}");
            manual_seed(seed);
            using var model = new DeepSeekForCausalLM(Config(Tokenizer.Value.VocabSize, context)).InitializeWeights();
            HfModelFolder.Save(dir, model, Tokenizer.Value);
            Written[(seed, context)] = dir;
            return dir;
        }
    }

    /// <summary>The reference port's tiny model (tests/reference/make_goldens.py): a folder this code did not write.</summary>
    public static string ReferenceTiny => Path.Combine(RepositoryRoot(), "tests", "Training.Tests", "Goldens", "hf-tiny");

    public static string ReferenceExpected => Path.Combine(RepositoryRoot(), "tests", "Training.Tests", "Goldens", "hf-tiny-expected.safetensors");

    public static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "DeepSeekCluster.sln"))) return dir.FullName;
        throw new DirectoryNotFoundException($"no DeepSeekCluster.sln above {AppContext.BaseDirectory}");
    }
}
