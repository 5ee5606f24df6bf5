// A single-process training checkpoint: model + optimizer tensors in one safetensors file, and the trainer's position.
using System.Text.Json;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.Training.Engine;

/// <summary>What, besides tensors, a resumed run needs to continue exactly where it stopped.</summary>
public sealed record TrainerState(long Step, long OptimizerSteps, long ConsumedSamples, long Seed, int GlobalBatch, int SeqLen, string TokenizerHash);

/// <summary>
/// Layout: <c>{dir}/step-{step:D8}/rank-0.safetensors</c> (HF-named model tensors, the routing-bias buffers, and
/// <c>optimizer.*</c> moments) plus <c>trainer_state.json</c>. A step folder appears only complete: it is
/// written under a temporary name and renamed. There is no RNG state to keep: training draws no random numbers
/// (no dropout) and the data order is a pure function of (seed, consumed samples).
/// </summary>
public static class TrainingCheckpoint
{
    const string StateFile = "trainer_state.json";
    const string TensorFile = "rank-0.safetensors";

    public static string Save(string dir, Trainer trainer, string tokenizerHash, int keepLast = 2)
    {
        var final = Path.Combine(dir, $"step-{trainer.Step:D8}");
        var tmp = final + ".tmp";
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        var tensors = trainer.Model.HfStateDict().Where(kv => !IsMtpCopy(kv.Key, trainer.Model.Config))
            .Concat(trainer.Optimizer.StateTensors());
        SafeTensors.Save(Path.Combine(tmp, TensorFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var state = new TrainerState(trainer.Step, trainer.Optimizer.StepCount, trainer.ConsumedSamples, trainer.Options.Seed,
            trainer.Options.GlobalBatch, trainer.Options.SeqLen, tokenizerHash);
        File.WriteAllText(Path.Combine(tmp, StateFile), JsonSerializer.Serialize(state, new JsonSerializerOptions { WriteIndented = true }));
        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        foreach (var old in List(dir).SkipLast(keepLast)) Directory.Delete(old, true);
        return final;
    }

    static bool IsMtpCopy(string name, DeepSeekConfig config) =>
        name.StartsWith("model.layers.", StringComparison.Ordinal) && int.Parse(name.Split('.')[2]) >= config.NumHiddenLayers
        && (name.EndsWith(".embed_tokens.weight", StringComparison.Ordinal) || name.EndsWith(".shared_head.head.weight", StringComparison.Ordinal));

    /// <summary>Complete checkpoint folders, oldest first.</summary>
    public static IReadOnlyList<string> List(string dir) =>
        Directory.Exists(dir)
            ? Directory.GetDirectories(dir, "step-*").Where(d => !d.EndsWith(".tmp", StringComparison.Ordinal) && File.Exists(Path.Combine(d, StateFile))).Order(StringComparer.Ordinal).ToList()
            : [];

    public static string? Latest(string dir) => List(dir).LastOrDefault();

    /// <summary>Restores weights, routing biases, optimizer moments and the step into <paramref name="trainer"/>.</summary>
    public static TrainerState Load(string stepDir, Trainer trainer, string tokenizerHash)
    {
        var statePath = Path.Combine(stepDir, StateFile);
        if (!File.Exists(statePath)) throw new FileNotFoundException($"Checkpoint '{stepDir}' has no {StateFile}: it is incomplete.", statePath);
        var state = JsonSerializer.Deserialize<TrainerState>(File.ReadAllText(statePath))
                    ?? throw new InvalidDataException($"{statePath}: empty trainer state");
        if (state.GlobalBatch != trainer.Options.GlobalBatch || state.SeqLen != trainer.Options.SeqLen || state.Seed != trainer.Options.Seed)
            throw new InvalidDataException($"{stepDir}: saved with global_batch {state.GlobalBatch}, seq_len {state.SeqLen}, seed {state.Seed}; " +
                $"this run has {trainer.Options.GlobalBatch}, {trainer.Options.SeqLen}, {trainer.Options.Seed} — resuming would change the data order");
        if (state.TokenizerHash != tokenizerHash)
            throw new InvalidDataException($"{stepDir}: saved with tokenizer {state.TokenizerHash[..12]}, this run's is {tokenizerHash[..12]}");
        using var file = SafeTensors.Open(Path.Combine(stepDir, TensorFile));
        var tensors = file.Tensors.ToDictionary(t => t.Name, t => file.Read(t.Name));
        try
        {
            trainer.Model.LoadHfStateDict(tensors.Where(kv => !kv.Key.StartsWith("optimizer.", StringComparison.Ordinal)).ToDictionary(), stepDir);
            trainer.Optimizer.LoadStateTensors(tensors, stepDir);
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        trainer.ResumeAt(state.Step, state.OptimizerSteps);
        return state;
    }
}
