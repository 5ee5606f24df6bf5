// The named tensors of a training checkpoint: HF-named weights and routing-bias buffers, plus optimizer.* state.
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

public static class CheckpointTensors
{
    /// <summary>
    /// Model tensors under HF names (without the MTP layers' copies of the shared embedding and head, which alias
    /// them) and, when given, AdamW's exp_avg / exp_avg_sq / master. Aliases, not copies.
    /// </summary>
    public static List<KeyValuePair<string, Tensor>> Collect(DeepSeekForCausalLM model, AdamW? optimizer)
    {
        var result = model.HfStateDict().Where(kv => !IsMtpCopy(kv.Key, model.Config)).ToList();
        if (optimizer is not null) result.AddRange(optimizer.StateTensors());
        return result;
    }

    /// <summary>
    /// The catalog of <paramref name="model"/> and <paramref name="optimizer"/>'s tensors, with the whole shape of each
    /// optimizer state even when this rank holds a ZeRO shard of its rows (the checkpoint stores whole tensors).
    /// </summary>
    public static List<TensorEntry> Catalog(DeepSeekForCausalLM model, AdamW? optimizer)
    {
        var whole = new Dictionary<string, long[]>(StringComparer.Ordinal);
        foreach (var s in optimizer?.Slots ?? [])
            foreach (var kind in new[] { "exp_avg", "exp_avg_sq", "master" }) whole[$"optimizer.{s.Name}.{kind}"] = s.Param.shape;
        var entries = Catalog(Collect(model, optimizer)).Select(e => whole.TryGetValue(e.Name, out var shape) ? e with { Shape = shape } : e).ToList();
        return model.MoeLayers().Any(m => m.experts.Count != model.Config.NRoutedExperts) ? WithEveryExpert(entries, model.Config.NRoutedExperts) : entries;
    }

    /// <summary>
    /// An expert-parallel rank's catalog made the whole model's: each routed expert tensor it holds stands for the same
    /// tensor of every expert (they share shape and dtype), so every rank names the same checkpoint.
    /// </summary>
    static List<TensorEntry> WithEveryExpert(List<TensorEntry> entries, int routedExperts)
    {
        var result = new List<TensorEntry>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var e in entries)
        {
            var m = ShardingPlan.ExpertIndex.Match(e.Name);
            if (!m.Success) { if (seen.Add(e.Name)) result.Add(e); continue; }
            for (int x = 0; x < routedExperts; x++)
            {
                var name = $"{e.Name[..m.Index]}.mlp.experts.{x}.{e.Name[(m.Index + m.Length)..]}";
                if (seen.Add(name)) result.Add(e with { Name = name });
            }
        }
        return result;
    }

    public static List<TensorEntry> Catalog(IEnumerable<KeyValuePair<string, Tensor>> tensors) =>
        tensors.Select(kv => new TensorEntry(kv.Key, SafeTensorDtype.Of(kv.Value.dtype, kv.Key).Name, kv.Value.shape)).ToList();

    /// <summary>
    /// Copies whole tensors into the model and, when the checkpoint holds optimizer state, into the optimizer; sets the
    /// optimizer's step count. A checkpoint without optimizer state (an import) leaves the optimizer fresh.
    /// </summary>
    public static void Apply(IReadOnlyDictionary<string, Tensor> tensors, CheckpointManifest manifest, DeepSeekForCausalLM model, AdamW? optimizer, string source)
    {
        model.LoadHfStateDict(tensors.Where(kv => !ShardingPlan.IsOptimizerState(kv.Key)).ToDictionary(), source);
        if (optimizer is null) return;
        if (tensors.Keys.Any(ShardingPlan.IsOptimizerState))
        {
            optimizer.LoadStateTensors(tensors, source);
            optimizer.StepCount = manifest.OptimizerSteps;
        }
        else optimizer.StepCount = 0;
    }

    internal static bool IsMtpCopy(string name, DeepSeekConfig config) =>
        name.StartsWith("model.layers.", StringComparison.Ordinal) && int.Parse(name.Split('.')[2]) >= config.NumHiddenLayers
        && (name.EndsWith(".embed_tokens.weight", StringComparison.Ordinal) || name.EndsWith(".shared_head.head.weight", StringComparison.Ordinal));
}
