// The standalone trainer's checkpoints: the cluster's sharded format (one rank) in a folder CheckpointStore, plus the data order.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;

namespace DeepSeekCluster.Training.Engine;

/// <summary>What, besides tensors, a resumed run needs to continue exactly where it stopped.</summary>
public sealed record TrainerState(long Step, long OptimizerSteps, long ConsumedSamples, long Seed, int GlobalBatch, int SeqLen, string TokenizerHash);

/// <summary>
/// Layout: <c>{dir}/standalone/{step:D8}/rank-0.safetensors</c> (HF-named model tensors, the routing-bias buffers and
/// <c>optimizer.*</c> moments) and <c>manifest.json</c> (config.json, tokenizer hash, position, data order), written by
/// <see cref="FolderCheckpointStore"/> exactly as a one-rank cluster job writes them: a CheckpointStore whose
/// <c>Storage:Folder</c> is <c>{dir}</c> serves them, and <c>LoadReplicaAsync</c> or any other layout loads them. A step
/// without its manifest does not exist. There is no RNG state to keep: training draws no random numbers (no dropout)
/// and the data order is a pure function of (seed, global batch, sequence length, consumed samples).
/// </summary>
public static class TrainingCheckpoint
{
    /// <summary>The job name of a standalone run's checkpoints.</summary>
    public const string Job = "standalone";

    /// <summary>Saves the trainer's state as a committed step; replaces an earlier save of the same step; keeps the newest <paramref name="keepLast"/>.</summary>
    public static string Save(string dir, Trainer trainer, string tokenizerHash, int keepLast = 2)
    {
        using var store = new FolderCheckpointStore(dir, Job);
        string final = store.StepFolder(trainer.Step);
        if (Directory.Exists(final)) Delete(final); // a --fresh run over an old one: its steps are not this run's

        var tensors = CheckpointTensors.Collect(trainer.Model, trainer.Optimizer);
        var plan = new ShardingPlan(ParallelLayout.Even(1, 1, trainer.Model.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        var file = ShardedCheckpointWriter.WriteRank(store, plan, 0, trainer.Step, tensors.ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal));
        var position = new CheckpointPosition(trainer.Step, 0, trainer.ConsumedSamples, trainer.Optimizer.StepCount);
        var manifest = ShardedCheckpointWriter.Manifest(Job, plan, position, [file], trainer.Model.Config.ToJson(), tokenizerHash) with
        {
            DataOrder = new DataOrder(trainer.Options.Seed, trainer.Options.GlobalBatch, trainer.Options.SeqLen),
        };
        store.CommitAsync(manifest).GetAwaiter().GetResult();
        foreach (var old in List(dir).SkipLast(keepLast)) Delete(old);
        return final;
    }

    /// <summary>Committed step folders, oldest first.</summary>
    public static IReadOnlyList<string> List(string dir)
    {
        using var store = new FolderCheckpointStore(dir, Job);
        return store.ListStepsAsync().GetAwaiter().GetResult().Select(store.StepFolder).ToList();
    }

    public static string? Latest(string dir) => List(dir).LastOrDefault();

    /// <summary>
    /// Restores weights, routing biases, optimizer moments and the step into <paramref name="trainer"/> from a step folder
    /// that <see cref="List"/> returned; refuses (before touching the model) another model, another tokenizer or another
    /// data order.
    /// </summary>
    public static TrainerState Load(string stepDir, Trainer trainer, string tokenizerHash)
    {
        string full = Path.GetFullPath(stepDir).TrimEnd(Path.DirectorySeparatorChar);
        string jobDir = Path.GetDirectoryName(full)!;
        if (!long.TryParse(Path.GetFileName(full), out long step) || Path.GetFileName(jobDir) != Job)
            throw new ArgumentException($"'{stepDir}' is not a standalone checkpoint step folder ({{dir}}/{Job}/NNNNNNNN)", nameof(stepDir));
        using var store = new FolderCheckpointStore(Path.GetDirectoryName(jobDir)!, Job);
        var manifest = store.ReadManifestAsync(step).GetAwaiter().GetResult();
        var order = manifest.DataOrder
            ?? throw new InvalidDataException($"{stepDir}: the manifest has no data_order (seed, global_batch, seq_len), so an exact resume cannot be checked");
        var options = trainer.Options;
        if (order.GlobalBatch != options.GlobalBatch || order.SeqLen != options.SeqLen || order.Seed != options.Seed)
            throw new InvalidDataException($"{stepDir}: saved with global_batch {order.GlobalBatch}, seq_len {order.SeqLen}, seed {order.Seed}; " +
                $"this run has {options.GlobalBatch}, {options.SeqLen}, {options.Seed} — resuming would change the data order");
        if (manifest.ConsumedSamples != step * options.GlobalBatch)
            throw new InvalidDataException($"{stepDir}: {manifest.ConsumedSamples} samples consumed by step {step}; a standalone run consumes {options.GlobalBatch} per step");

        manifest = ShardedCheckpointLoader.LoadReplicaAsync(store, step, trainer.Model, trainer.Optimizer, tokenizerHash).GetAwaiter().GetResult();
        trainer.ResumeAt(manifest.Step, manifest.OptimizerSteps);
        return new TrainerState(manifest.Step, manifest.OptimizerSteps, manifest.ConsumedSamples, order.Seed, order.GlobalBatch, order.SeqLen,
            manifest.TokenizerSha256 ?? tokenizerHash);
    }

    /// <summary>The manifest goes first, so a deletion cut short leaves an uncommitted folder that readers ignore, never a committed half.</summary>
    static void Delete(string stepFolder)
    {
        File.Delete(Path.Combine(stepFolder, CheckpointManifest.FileName));
        Directory.Delete(stepFolder, recursive: true);
    }
}
