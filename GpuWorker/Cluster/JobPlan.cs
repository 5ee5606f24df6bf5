// The job spec an assignment carries, as this worker trains it: the one mapping from the spec to the model config and
// the training options, and the fingerprint that tells whether a live state kept from before was built for the same.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using Assignment = DeepSeekCluster.Contracts.Control.Assignment;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <param name="Fingerprint">The job, its spec and its data (and a stage's index): another fingerprint cannot reuse a live state.</param>
public sealed record JobPlan(JobSpec Spec, DeepSeekConfig Config, TrainingOptions Options, string Fingerprint)
{
    /// <summary>
    /// The plan of <paramref name="assignment"/>'s job (its <paramref name="spec"/>, read with JobSpecJson) on the dataset the data service describes. The Coordinator
    /// validated the spec when it was submitted (JobSpec.Validate) and it is not checked again; what only the worker can
    /// check fails where it is used, naming the numbers: the model config here, the preset's depth against pp in
    /// ParallelLayout.Even, the options against the data-parallel width in the trainer's constructor.
    /// </summary>
    public static JobPlan For(Assignment assignment, JobSpec spec, GetManifestReply manifest, GetTokenizerReply tokenizer, bool cuda = false)
    {
        var (config, options) = Map(spec, manifest.VocabSize, tokenizer.EotTokenId, cuda);
        string fingerprint = ReplicaState.FingerprintOf(assignment.JobId, assignment.JobSpecJson, manifest.VocabSize, tokenizer.TokenizerHash)
                             + (assignment.PpSize > 1 ? $"/stage {assignment.PpStage}" : "") // a stage's state is no other stage's
                             // nor a ZeRO shard another's; with redundancy the state names its shard and a new layout reshards it (LiveShards)
                             + (spec.Parallel.Zero > 0 && !spec.Parallel.Redundancy ? $"/zero shard {assignment.DpRank} of {assignment.DpSize}" : "")
                             // nor an expert shard (ParallelLayout.ExpertShardOfRank); with redundancy a reshard moves it
                             + (spec.Parallel.Ep > 1 && !spec.Parallel.Redundancy ? $"/expert shard {assignment.DpRank % spec.Parallel.Ep} of {spec.Parallel.Ep}" : "");
        return new JobPlan(spec, config, options, fingerprint);
    }

    /// <summary>
    /// The model config (the preset or the spec's config.json, with the dataset's vocabulary and end-of-text token) and
    /// the training options (batch, schedule and its shape, optimizer knobs, seed, checkpoints, validation, pipeline schedule,
    /// ZeRO stage, expert-parallel width, the overlapped all-reduce, precision) of <paramref name="spec"/>; precision auto is bf16 on CUDA (<paramref name="cuda"/>) and fp32 on CPU.
    /// </summary>
    public static (DeepSeekConfig Config, TrainingOptions Options) Map(JobSpec spec, int vocabSize, int eosTokenId, bool cuda = false)
    {
        var baseConfig = spec.ModelConfigJson is { Length: > 0 } json ? DeepSeekConfig.FromJson(json, "job spec modelConfigJson") : DeepSeekConfig.Preset(spec.ModelPreset!);
        var config = (baseConfig with { VocabSize = vocabSize, EosTokenId = eosTokenId }).Validated();
        var options = new TrainingOptions
        {
            SeqLen = spec.SeqLen, GlobalBatch = spec.GlobalBatch, MicroBatch = spec.MicroBatch, Steps = spec.Steps,
            Lr = spec.Schedule.PeakLr, Schedule = spec.Schedule.Kind, WarmupSteps = spec.Schedule.WarmupSteps,
            MinLrRatio = spec.Schedule.PeakLr > 0 ? spec.Schedule.MinLr / spec.Schedule.PeakLr : 0.1,
            Seed = spec.Seed, CheckpointEvery = spec.CheckpointInterval, EvalEvery = spec.EvalInterval, EvalBatches = Evaluation.ClusterBatches,
            PipelineSchedule = spec.Parallel.Schedule, Zero = spec.Parallel.Zero, Ep = spec.Parallel.Ep, Recompute = spec.ActivationCheckpointing,
            OverlapGradientReduction = spec.Parallel.OverlapGradientReduction,
            Precision = PrecisionOf(spec, cuda), DecayFraction = spec.Schedule.DecayFraction,
            WeightDecay = spec.WeightDecay, ClipNorm = spec.ClipNorm, MtpWeight = spec.MtpWeight, BiasUpdateSpeed = spec.BiasUpdateSpeed,
            Beta1 = spec.Beta1, Beta2 = spec.Beta2, Epsilon = spec.Epsilon,
        };
        return (config, options);
    }

    /// <summary>The finder's answers in this process, by model, layout, inputs and memory: found once per model and device.</summary>
    static readonly System.Collections.Concurrent.ConcurrentDictionary<string, MicroBatchChoice> FoundMicroBatches = new();

    /// <summary>
    /// The plan with the micro-batch the batch-size finder picks for <paramref name="assignment"/>'s rank when the spec leaves
    /// microBatch unset (0): the largest that splits the replica's share of a step into whole micro-batches and whose
    /// predicted bytes fit <paramref name="budgetBytes"/> with headroom (MicroBatchFinder). Every rank of a job on the same
    /// device and budget picks the same. A spec that sets it gets this plan back unchanged (null choice).
    /// </summary>
    public (JobPlan Plan, MicroBatchChoice? Found) WithMicroBatchFound(Assignment assignment, TorchSharp.torch.Device device, long budgetBytes)
    {
        if (Spec.MicroBatch > 0) return (this, null);
        int dp = assignment.DpSize, pp = Math.Max(1, assignment.PpSize), share = Options.GlobalBatch / dp;
        var layout = ParallelLayout.Even(dp, pp, Config.NumHiddenLayers).WithShards(Spec.Parallel.Ep, Spec.Parallel.Zero, Config.NRoutedExperts);
        var inputs = new MemoryInputs(Options.Precision, Spec.ActivationCheckpointing, 1, Options.SeqLen, share, Options.PipelineSchedule, Spec.Parallel.Redundancy,
                                      Device: device.type);
        string key = $"{device}|{budgetBytes}|{Config.ToJson()}|{dp}x{pp}/{layout.Ep}/{layout.Zero}|{inputs}|{share}";
        var found = FoundMicroBatches.GetOrAdd(key, _ => MicroBatchFinder.Find(Config, layout, inputs, share, budgetBytes));
        return (this with { Options = Options with { MicroBatch = found.MicroBatch } }, found);
    }

    /// <summary>The spec's precision as the trainer takes it: auto is bf16 on CUDA (bf16 matmul units) and fp32 on CPU.</summary>
    public static string PrecisionOf(JobSpec spec, bool cuda) => spec.Precision switch
    {
        "auto" or null or "" => cuda ? "bf16" : "fp32",
        var p => p,
    };
}
