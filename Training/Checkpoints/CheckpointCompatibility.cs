// Refuses a checkpoint of another model before a single tensor is written: config fields first, then the tensor catalogue.
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;

namespace DeepSeekCluster.Training.Checkpoints;

public static class CheckpointCompatibility
{
    /// <summary>
    /// config.json fields that say nothing about the weights: token ids, the dtype the weights happen to be stored in (the
    /// catalogue check and the copy handle dtypes), and how fresh weights would be initialised.
    /// </summary>
    static readonly HashSet<string> NotModelShape = new(StringComparer.Ordinal)
        { "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "initializer_range" };

    /// <summary>
    /// Throws <see cref="InvalidDataException"/> naming every differing config field ("is for hidden_size 256,
    /// n_routed_experts 8; this model has hidden_size 128, n_routed_experts 4") or, when the configs agree or the
    /// checkpoint has none, the tensors that are missing, extra or of another shape. Optimizer state is compared only
    /// when <paramref name="optimizer"/> is given and the checkpoint holds some.
    /// </summary>
    public static void Check(CheckpointManifest manifest, DeepSeekForCausalLM model, AdamW? optimizer, string label)
    {
        if (manifest.Config is { } config)
        {
            var saved = DeepSeekConfig.FromJson(config.GetRawText(), $"the config.json of {label}");
            var differing = Differences(saved, model.Config);
            if (differing.Count > 0)
                throw new InvalidDataException($"{label} is for a different model: it is for {string.Join(", ", differing.Select(d => $"{d.Name} {d.Saved}"))}; " +
                    $"this model has {string.Join(", ", differing.Select(d => $"{d.Name} {d.Ours}"))}. Nothing was loaded.");
        }

        bool withOptimizer = optimizer is not null && manifest.Tensors.Keys.Any(ShardingPlan.IsOptimizerState);
        var ours = CheckpointTensors.Catalog(model, withOptimizer ? optimizer : null)
            .ToDictionary(t => t.Name, StringComparer.Ordinal);
        var problems = new List<string>();
        var extra = manifest.Tensors.Keys
            .Where(n => !ours.ContainsKey(n) && (withOptimizer || !ShardingPlan.IsOptimizerState(n))).Order(StringComparer.Ordinal).ToList();
        if (extra.Count > 0) problems.Add($"tensors this model does not have: {List(extra)}");
        var missing = ours.Keys.Where(n => !manifest.Tensors.ContainsKey(n) && !MayBeAbsent(n, model.Config)).Order(StringComparer.Ordinal).ToList();
        if (missing.Count > 0) problems.Add($"tensors the checkpoint lacks: {List(missing)}");
        var reshaped = ours.Values.Where(t => manifest.Tensors.TryGetValue(t.Name, out var s) && !s.Shape.SequenceEqual(t.Shape))
            .Select(t => $"'{t.Name}' is [{string.Join(", ", manifest.Tensors[t.Name].Shape)}] in the checkpoint, [{string.Join(", ", t.Shape)}] in this model").ToList();
        if (reshaped.Count > 0) problems.Add(List(reshaped));
        if (problems.Count > 0)
            throw new InvalidDataException($"{label} does not fit this model: {string.Join("; ", problems)}. Nothing was loaded.");
    }

    /// <summary>The config fields that shape or define the model, where the two differ, in config.json order.</summary>
    public static List<(string Name, string Saved, string Ours)> Differences(DeepSeekConfig saved, DeepSeekConfig ours)
    {
        var a = (JsonObject)JsonNode.Parse(saved.ToJson())!;
        var b = (JsonObject)JsonNode.Parse(ours.ToJson())!;
        var result = new List<(string, string, string)>();
        foreach (var name in a.Select(kv => kv.Key).Union(b.Select(kv => kv.Key)))
        {
            if (NotModelShape.Contains(name)) continue;
            JsonNode? x = a[name], y = b[name];
            if (!JsonNode.DeepEquals(x, y)) result.Add((name, Text(x), Text(y)));
        }
        return result;
    }

    /// <summary>HF folders usually come without the MTP layers; the model keeps its own (as <c>LoadHfStateDict</c> does).</summary>
    static bool MayBeAbsent(string name, DeepSeekConfig config) =>
        name.StartsWith("model.layers.", StringComparison.Ordinal) && int.Parse(name.Split('.')[2]) >= config.NumHiddenLayers
        || name.StartsWith("optimizer.", StringComparison.Ordinal) && name.EndsWith(".master", StringComparison.Ordinal);

    static string Text(JsonNode? node) => node is null ? "(absent)" : node.ToJsonString();

    static string List(IReadOnlyList<string> items) =>
        string.Join(", ", items.Take(8)) + (items.Count > 8 ? $" and {items.Count - 8} more" : "");
}
