// A Hugging Face model folder: config.json, model.safetensors (or shards + index), tokenizer.json, generation_config.json.
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

public sealed record LoadedModel(DeepSeekForCausalLM Model, BpeTokenizer? Tokenizer, string Directory);

public static class HfModelFolder
{
    public const string ConfigFile = "config.json";
    public const string TokenizerFile = "tokenizer.json";
    public const string GenerationConfigFile = "generation_config.json";

    /// <summary>Writes the model as DeepseekV3ForCausalLM would save it (plus MTP weights as model.layers.{L+k}).</summary>
    public static void Save(string dir, DeepSeekForCausalLM model, BpeTokenizer? tokenizer, long maxShardBytes = 5L << 30)
    {
        Directory.CreateDirectory(dir);
        var dtype = model.lm_head.weight!.dtype switch
        {
            ScalarType.BFloat16 => "bfloat16", ScalarType.Float16 => "float16", ScalarType.Float64 => "float64", _ => "float32",
        };
        var config = model.Config with
        {
            TorchDtype = dtype,
            BosTokenId = tokenizer?.BosTokenId ?? model.Config.BosTokenId,
            EosTokenId = tokenizer?.EosTokenId ?? model.Config.EosTokenId,
        };
        WriteAtomically(Path.Combine(dir, ConfigFile), config.ToJson());
        var generation = new JsonObject
        {
            ["bos_token_id"] = config.BosTokenId, ["eos_token_id"] = config.EosTokenId, ["do_sample"] = false,
        };
        WriteAtomically(Path.Combine(dir, GenerationConfigFile), generation.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        HfWeights.Save(dir, model.HfStateDict(), maxShardBytes);
        if (tokenizer is not null) WriteAtomically(Path.Combine(dir, TokenizerFile), tokenizer.ToJson());
    }

    /// <summary>Loads config.json, the weights (single file or sharded) and tokenizer.json when present.</summary>
    public static LoadedModel Load(string dir, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"Model folder '{dir}' does not exist.");
        var configPath = Path.Combine(dir, ConfigFile);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"Model folder '{dir}' has no {ConfigFile}.", configPath);
        var config = DeepSeekConfig.Load(configPath).Validated();
        var weights = PretrainedWeights.Load(dir);
        try
        {
            var model = new DeepSeekForCausalLM(config);
            model.LoadHfStateDict(weights, dir);
            model.to(dtype);
            if (device is not null) model.to(device);
            var tokenizerPath = Path.Combine(dir, TokenizerFile);
            var tokenizer = File.Exists(tokenizerPath) ? BpeTokenizer.Load(tokenizerPath) : null;
            return new LoadedModel(model, tokenizer, dir);
        }
        finally
        {
            foreach (var t in weights.Values) t.Dispose();
        }
    }

    static void WriteAtomically(string path, string text)
    {
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, text);
        File.Move(tmp, path, overwrite: true);
    }
}
