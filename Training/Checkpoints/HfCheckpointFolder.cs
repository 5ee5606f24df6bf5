// Converts between committed sharded checkpoints and Hugging Face model folders (config.json, sharded safetensors + index, tokenizer.json).
using DeepSeekCluster.Training.Parallel;
using System.Security.Cryptography;
using DeepSeekCluster.Training.IO;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

public static class HfCheckpointFolder
{
    /// <summary>
    /// Writes the model weights of a committed step as a Hugging Face folder: the manifest's config.json verbatim, the
    /// weights (optimizer state left out) in shards of at most <paramref name="maxShardBytes"/> with an index, MTP layers
    /// with their copies of the embedding and head as DeepSeek-V3's release has them, and tokenizer.json when given.
    /// </summary>
    public static async Task ExportAsync(ICheckpointSource source, long step, string dir, string? tokenizerJsonPath = null,
        long maxShardBytes = 5L << 30, CancellationToken ct = default)
    {
        var manifest = await source.ReadManifestAsync(step, ct);
        if (manifest.Config is not { } config)
            throw new InvalidDataException($"step {step} of job '{manifest.Job}' has no embedded config.json; it cannot become a model folder");
        var parsed = Model.DeepSeekConfig.FromJson(config.GetRawText(), $"the manifest of step {step}");
        var wanted = manifest.Tensors.Where(kv => !ShardingPlan.IsOptimizerState(kv.Key))
            .Select(kv => new TensorSlice(kv.Key, 0, kv.Value.Rows));
        var tensors = await ShardedCheckpointLoader.LoadAsync(source, manifest, wanted, ct);
        try
        {
            var ordered = tensors.ToList();
            string head = tensors.ContainsKey("lm_head.weight") ? "lm_head.weight" : "model.embed_tokens.weight";
            for (int k = 0; k < parsed.NumNextnPredictLayers; k++)
            {
                int layer = parsed.NumHiddenLayers + k;
                if (!tensors.Keys.Any(n => n.StartsWith($"model.layers.{layer}.", StringComparison.Ordinal))) continue;
                ordered.Add(new($"model.layers.{layer}.embed_tokens.weight", tensors["model.embed_tokens.weight"]));
                ordered.Add(new($"model.layers.{layer}.shared_head.head.weight", tensors[head]));
            }
            Directory.CreateDirectory(dir);
            HfWeights.Save(dir, ordered, maxShardBytes);
            await File.WriteAllTextAsync(Path.Combine(dir, HfModelFolder.ConfigFile), config.GetRawText(), ct);
            if (tokenizerJsonPath is not null) File.Copy(tokenizerJsonPath, Path.Combine(dir, HfModelFolder.TokenizerFile), overwrite: true);
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }

    /// <summary>
    /// Turns a Hugging Face folder into a committed checkpoint of <paramref name="job"/> at <paramref name="step"/>, sharded
    /// for <paramref name="layout"/>. It holds weights and routing biases but no optimizer state: loading it starts AdamW
    /// fresh (step count 0).
    /// </summary>
    public static async Task<CheckpointManifest> ImportAsync(string hfDir, ICheckpointSink sink, string job, ParallelLayout layout,
        long step = 0, CancellationToken ct = default)
    {
        var loaded = HfModelFolder.Load(hfDir);
        using var model = loaded.Model;
        var tokenizerPath = Path.Combine(hfDir, HfModelFolder.TokenizerFile);
        string? tokenizerSha = File.Exists(tokenizerPath) ? Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(tokenizerPath))) : null;
        var configJson = await File.ReadAllTextAsync(Path.Combine(hfDir, HfModelFolder.ConfigFile), ct);
        using var noGrad = no_grad();
        return await ShardedCheckpointWriter.SaveAllRanksAsync(sink, job, layout, CheckpointTensors.Collect(model, null),
            new CheckpointPosition(step, 0, 0, 0), configJson, tokenizerSha, ct);
    }
}
