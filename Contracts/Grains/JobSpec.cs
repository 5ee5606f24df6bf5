// What a user submits to train: model, data, parallel plan, batch, schedule, checkpoints, worker bounds. Validated as a whole.
using System.Text.Json;

namespace DeepSeekCluster.Contracts.Grains;

[GenerateSerializer, Immutable]
public sealed partial record JobSpec
{
    /// <summary>Names the model presets the Training library knows (DeepSeekConfig.Preset); Contracts cannot reference it.</summary>
    public static readonly string[] ModelPresets = ["tiny", "small", "deepseek-v3", "deepseek-v2-lite", "v2-lite-80gb"];
    /// <summary>
    /// Each preset's n_routed_experts, so that parallel.ep is checked against it at submission rather than failing the first
    /// generation; PresetFactsTests (GpuWorker.Tests) holds it equal to DeepSeekConfig.Preset's.
    /// </summary>
    public static readonly IReadOnlyDictionary<string, int> PresetRoutedExperts = new Dictionary<string, int>
    {
        ["tiny"] = 8, ["small"] = 16, ["deepseek-v3"] = 256, ["deepseek-v2-lite"] = 64, ["v2-lite-80gb"] = 64,
    };

    /// <summary>Optional job id; a fresh one is generated when absent.</summary>
    [Id(0)] public string? Name { get; init; }

    /// <summary>A preset name (tiny, small, …) or, instead, a Hugging Face config.json in <see cref="ModelConfigJson"/>.</summary>
    [Id(1)] public string? ModelPreset { get; init; }
    [Id(2)] public string? ModelConfigJson { get; init; }

    /// <summary>Dataset name in DataShardService.</summary>
    [Id(3)] public string Dataset { get; init; } = "";
    [Id(4)] public ParallelPlan Parallel { get; init; } = new();

    /// <summary>Sequences per optimizer step over the whole job; fixed whatever the data-parallel width.</summary>
    [Id(5)] public int GlobalBatch { get; init; }
    /// <summary>Sequences per forward/backward; 0 (absent): each worker's batch-size finder picks the largest that fits its memory.</summary>
    [Id(6)] public int MicroBatch { get; init; }
    [Id(7)] public int SeqLen { get; init; }
    [Id(8)] public int Steps { get; init; }
    [Id(9)] public LrSchedule Schedule { get; init; } = new();

    /// <summary>Steps between checkpoints; 0 saves only at the end.</summary>
    [Id(10)] public int CheckpointInterval { get; init; }
    [Id(11)] public int MinWorkers { get; init; } = 1;
    [Id(12)] public int MaxWorkers { get; init; } = 1;
    [Id(13)] public int Seed { get; init; } = 1337;

    /// <summary>Steps between validation passes over the held-out split (the loss on that step's report); 0 validates only at the end.</summary>
    [Id(14)] public int EvalInterval { get; init; }

    /// <summary>The text the trained model continues at the end of the job (the standalone run's --sample-prompt).</summary>
    [Id(15)] public string SamplePrompt { get; init; } = DefaultSamplePrompt;

    public const string DefaultSamplePrompt = "In the beginning";
    /// <summary>Characters a sample prompt may hold: it is logged and encoded whole.</summary>
    public const int MaxSamplePromptLength = 1000;

    /// <summary>
    /// Committed checkpoints kept in the store: after each commit the older ones are deleted, never the newest nor one a
    /// resume may still load. 0 keeps every checkpoint. 3 leaves room for a resume in progress while a newer one commits.
    /// </summary>
    [Id(16)] public int KeepLast { get; init; } = 3;

    /// <summary>The compute precisions a job may ask for; auto is bf16 on CUDA and fp32 on CPU (docs/parallelism.md).</summary>
    public static readonly string[] Precisions = ["auto", "fp32", "bf16"];
    /// <summary>bf16: bf16 weights and activations with fp32 master weights, moments and reductions; auto: bf16 on CUDA, fp32 on CPU.</summary>
    [Id(35)] public string Precision { get; init; } = "auto";

    /// <summary>Activation recompute: none, full (per decoder layer), selective (only the cheap parts: norms, SwiGLU products, MLA up-projections).</summary>
    public static readonly string[] RecomputeModes = ["none", "full", "selective"];
    [Id(36)] public string ActivationCheckpointing { get; init; } = "none";

    // ---- The optimizer's knobs: the standalone trainer's options (TrainingOptions), with its defaults ----
    /// <summary>AdamW's decoupled weight decay (matrices only; norms and biases get none).</summary>
    [Id(17)] public double WeightDecay { get; init; } = 0.1;
    /// <summary>The global gradient norm is scaled down to this before the update; 0 never clips.</summary>
    [Id(18)] public double ClipNorm { get; init; } = 1.0;
    /// <summary>λ of DeepSeek-V3's multi-token-prediction loss; 0 skips the MTP modules.</summary>
    [Id(19)] public double MtpWeight { get; init; } = 0.3;
    /// <summary>γ of the auxiliary-loss-free balancing: the routing bias change per step.</summary>
    [Id(20)] public double BiasUpdateSpeed { get; init; } = 0.001;
    [Id(21)] public double Beta1 { get; init; } = 0.9;
    [Id(22)] public double Beta2 { get; init; } = 0.95;
    /// <summary>AdamW's ε, added to the root of the second moment.</summary>
    [Id(23)] public double Epsilon { get; init; } = 1e-8;

    /// <summary>What the worker does about a step that went wrong (NaN/Inf, a loss or gradient-norm spike): see docs/agent.md.</summary>
    [Id(24)] public StepGuardSpec Guard { get; init; } = new();
    /// <summary>
    /// Evaluation tasks scored at every scheduled checkpoint (checkpointInterval and the last step) by the job's replicas,
    /// the examples split over them: names of the tasks shipped with the workers (kjv_cloze, kjv_nextverse, kjv_heldout;
    /// docs/evaluation.md). Empty: none.
    /// </summary>
    [Id(30)] public string[] EvalTasks { get; init; } = [];
    /// <summary>The first N examples of each evaluation task (lm-evaluation-harness's --limit); 0: all of them.</summary>
    [Id(31)] public int EvalLimit { get; init; }
    /// <summary>
    /// A Hugging Face model folder (config.json + safetensors, as ours or transformers write them, FP8 block-quantized
    /// weights included) on every worker's filesystem: the job starts from its weights instead of a random
    /// initialization. Used only when the job has no committed checkpoint to resume from.
    /// </summary>
    [Id(32)] public string? InitFrom { get; init; }
    /// <summary>Evaluation tasks a job may name at most (each is scored at every checkpoint).</summary>
    public const int MaxEvalTasks = 8;

    /// <summary>
    /// Free workers go to the higher priority first, and a job that cannot form preempts running jobs of a lower priority
    /// (they release their workers and resume later from their newest committed checkpoint): docs/agent.md.
    /// </summary>
    [Id(55)] public int Priority { get; init; }
    public const int MaxPriority = 1000;
    /// <summary>Who the job runs for: the per-tenant worker quota (Coordinator:Quotas:&lt;tenant&gt;) counts its workers. Null: "default".</summary>
    [Id(56)] public string? Tenant { get; init; }
    public const string DefaultTenant = "default";
    /// <summary>
    /// Start from another job's committed checkpoint (a PBT exploit): the first generation loads it and trains on from its
    /// step; steps 1..step are that job's lineage (its ledger shows their samples). Used only while this job has no
    /// committed checkpoint of its own; a checkpoint that is not committed in the store is refused at submission.
    /// </summary>
    [Id(57)] public CheckpointRef? StartFrom { get; init; }

    /// <summary>Every problem, each named by its JSON field path, so a user fixes them all in one go.</summary>
    public IReadOnlyList<SpecProblem> Validate()
    {
        var problems = new List<SpecProblem>();
        void Problem(string field, string message) => problems.Add(new SpecProblem(field, message));

        if (Name is { Length: > 0 } && !IsValidName(Name))
            Problem("name", $"'{Name}' must be 1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.'");
        bool hasPreset = !string.IsNullOrWhiteSpace(ModelPreset), hasConfig = !string.IsNullOrWhiteSpace(ModelConfigJson);
        if (hasPreset == hasConfig)
            Problem("modelPreset", "give exactly one of modelPreset or modelConfigJson");
        if (hasPreset && !ModelPresets.Contains(ModelPreset!.ToLowerInvariant()))
            Problem("modelPreset", $"unknown preset '{ModelPreset}': expected one of {string.Join(", ", ModelPresets)}");
        if (hasConfig && !IsJsonObject(ModelConfigJson!))
            Problem("modelConfigJson", "must be a JSON object (a Hugging Face config.json)");
        if (string.IsNullOrWhiteSpace(Dataset)) Problem("dataset", "required: the DataShardService dataset name");

        int dp = Parallel?.Dp ?? 0, pp = Parallel?.Pp ?? 1;
        if (Parallel is null) Problem("parallel", "required");
        else
        {
            if (dp < 0) Problem("parallel.dp", $"{dp} must be 0 (as many as the workers allow) or positive");
            // pp may not exceed the model's decoder layers; Contracts cannot read a preset's depth, so the worker checks that
            // (ParallelLayout.Even) and fails the job naming both numbers.
            if (pp < 1) Problem("parallel.pp", $"{pp} must be at least 1");
            if (!ParallelPlan.Schedules.Contains(Parallel.Schedule))
                Problem("parallel.schedule", $"'{Parallel.Schedule}' must be one of {string.Join(", ", ParallelPlan.Schedules)} (the pipeline schedule)");
            foreach (var (field, message) in Parallel.Problems()) Problem(field, message);
            if (Parallel.Ep > 1 && RoutedExperts() is ({ } experts, var source) && experts % Parallel.Ep != 0)
                Problem("parallel.ep", $"{Parallel.Ep} must divide the model's {experts} routed experts ({source}): each expert shard holds experts / ep of them");
        }
        if (!Precisions.Contains(Precision))
            Problem("precision", $"'{Precision}' must be one of {string.Join(", ", Precisions)} (auto: bf16 on CUDA, fp32 on CPU)");
        if (!RecomputeModes.Contains(ActivationCheckpointing))
            Problem("activationCheckpointing", $"'{ActivationCheckpointing}' must be one of {string.Join(", ", RecomputeModes)}");
        if (GlobalBatch < 1) Problem("globalBatch", $"{GlobalBatch} must be at least 1 sequence");
        if (MicroBatch < 0) Problem("microBatch", $"{MicroBatch} must be at least 1 sequence, or 0 (absent) for the largest that fits a worker's memory");
        else if (MicroBatch > 0 && GlobalBatch >= 1 && GlobalBatch % MicroBatch != 0)
            Problem("microBatch", $"{MicroBatch} must divide globalBatch {GlobalBatch}");
        if (SeqLen < 1 || SeqLen > 1 << 20) Problem("seqLen", $"{SeqLen} must be between 1 and {1 << 20}");
        if (Steps < 1) Problem("steps", $"{Steps} must be at least 1");

        if (Schedule is null) Problem("schedule", "required");
        else
        {
            if (!LrSchedule.Kinds.Contains(Schedule.Kind)) Problem("schedule.kind", $"'{Schedule.Kind}' must be one of {string.Join(", ", LrSchedule.Kinds)}");
            if (!(Schedule.PeakLr > 0 && double.IsFinite(Schedule.PeakLr))) Problem("schedule.peakLr", $"{Schedule.PeakLr} must be a positive number");
            if (!(Schedule.MinLr >= 0 && Schedule.MinLr <= Schedule.PeakLr)) Problem("schedule.minLr", $"{Schedule.MinLr} must be between 0 and peakLr");
            if (Schedule.WarmupSteps < 0 || (Steps >= 1 && Schedule.WarmupSteps > Steps))
                Problem("schedule.warmupSteps", $"{Schedule.WarmupSteps} must be between 0 and steps ({Steps})");
            ValidateDecayFraction(Problem);
        }
        if (CheckpointInterval < 0) Problem("checkpointInterval", $"{CheckpointInterval} must be 0 (only at the end) or positive");
        if (EvalInterval < 0) Problem("evalInterval", $"{EvalInterval} must be 0 (validate only at the end) or a positive number of steps");
        if (SamplePrompt is null || SamplePrompt.Length > MaxSamplePromptLength || SamplePrompt.Any(c => char.IsControl(c) && c is not ('\n' or '\r' or '\t')))
            Problem("samplePrompt", $"must be text of at most {MaxSamplePromptLength} characters without control characters other than line breaks and tabs (got {(SamplePrompt is null ? "null" : $"{SamplePrompt.Length} characters")})");
        ValidateTraining(Problem);
        if (EvalTasks is null || EvalTasks.Length > MaxEvalTasks || EvalTasks.Any(t => !IsTaskName(t)) || EvalTasks.Distinct().Count() != EvalTasks.Length)
            Problem("evalTasks", $"must be at most {MaxEvalTasks} distinct task names of a-z, 0-9 and '_' (the shipped tasks: kjv_cloze, kjv_nextverse, kjv_heldout)");
        else if (EvalTasks.Length > 0 && pp > 1)
            Problem("evalTasks", $"needs parallel.pp = 1: each replica scores its share of the examples with the whole model (pp is {pp})");
        if (EvalLimit < 0) Problem("evalLimit", $"{EvalLimit} must be 0 (every example) or the number of examples per task");
        if (InitFrom is not null && (InitFrom.Length == 0 || InitFrom.Any(char.IsControl)))
            Problem("initFrom", "must be the path of a Hugging Face model folder on the workers (config.json and *.safetensors)");
        if (Priority is < -MaxPriority or > MaxPriority) Problem("priority", $"{Priority} must be between {-MaxPriority} and {MaxPriority} (higher runs first)");
        if (Tenant is not null && !IsValidName(Tenant)) Problem("tenant", $"'{Tenant}' must be 1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.'");
        if (StartFrom is { } from && (from.Job is null || !IsValidName(from.Job) || from.Step < 1 || Steps >= 1 && from.Step >= Steps))
            Problem("startFrom", $"must name a job (1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.') and a committed step between 1 and steps - 1 ({Steps - 1}), not '{from.Job}' at step {from.Step}");
        if (KeepLast < 0) Problem("keepLast", $"{KeepLast} must be 0 (keep every checkpoint) or the number of newest committed checkpoints to keep");

        if (MinWorkers < 1) Problem("minWorkers", $"{MinWorkers} must be at least 1");
        if (MaxWorkers < MinWorkers) Problem("maxWorkers", $"{MaxWorkers} must be at least minWorkers ({MinWorkers})");
        if (problems.Count == 0 && ChooseDataParallel(MaxWorkers) is null)
        {
            // Every condition a world must meet, with its numbers, so the user sees which one to change.
            int micros = GlobalBatch / Math.Max(1, MicroBatch);
            var needs = new List<string> { $"dp divides the {micros} micro-batch{(micros == 1 ? "" : "es")} of a step ({(MicroBatch > 0 ? $"globalBatch {GlobalBatch} / microBatch {MicroBatch}" : $"globalBatch {GlobalBatch}, microBatch 0: counted per sequence")})" };
            if (Parallel!.Ep > 1) needs.Add($"dp is a multiple of ep ({Parallel.Ep})");
            if (dp > 0) needs.Add($"dp is parallel.dp ({dp})");
            Problem("parallel", $"no world fits: a world is dp x pp ({pp}) workers, between minWorkers and maxWorkers ({MinWorkers}..{MaxWorkers}), where " +
                string.Join(" and ", needs));
        }
        // The copies live on the other replicas of a rank's ring: a job that can never have two keeps nothing, whatever it asks.
        if (problems.Count == 0 && Parallel!.Redundancy && ChooseDataParallel(MaxWorkers) == 1)
            Problem("parallel.redundancy", $"true, but the largest world of this job has one replica (dp 1 at maxWorkers {MaxWorkers}, pp {pp}{(dp > 0 ? $", parallel.dp {dp}" : "")}), " +
                    "so no other rank can keep a copy of its state: expected false, or room for dp 2 or more");
        return problems;
    }

    /// <summary>The model's routed experts and where that number comes from, or null when the spec does not say (a config without the key).</summary>
    (int? Experts, string Source) RoutedExperts()
    {
        if (!string.IsNullOrWhiteSpace(ModelPreset))
            return (PresetRoutedExperts.TryGetValue(ModelPreset.ToLowerInvariant(), out var n) ? n : null, $"preset {ModelPreset}");
        if (string.IsNullOrWhiteSpace(ModelConfigJson)) return (null, "");
        try
        {
            using var doc = JsonDocument.Parse(ModelConfigJson);
            return doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("n_routed_experts", out var e) && e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out var k) && k > 0
                ? (k, "n_routed_experts of modelConfigJson") : (null, "");
        }
        catch (JsonException) { return (null, ""); } // modelConfigJson's own problem is named already
    }

    /// <summary>
    /// The data-parallel width for <paramref name="available"/> workers: the largest dp with dp·pp in [min, max] workers and
    /// dp·microBatch dividing the global batch (so every replica gets whole micro-batches); null when none fits.
    /// </summary>
    public int? ChooseDataParallel(int available)
    {
        int pp = Math.Max(1, Parallel.Pp), microsPerStep = GlobalBatch / Math.Max(1, MicroBatch);
        for (int dp = Math.Min(available, MaxWorkers) / pp; dp >= 1; dp--)
        {
            if (Parallel.Dp > 0 && dp != Parallel.Dp) continue;
            if (dp * pp < MinWorkers) break;
            if (microsPerStep % dp == 0 && dp % Math.Max(1, Parallel.Ep) == 0) return dp;
        }
        return null;
    }

    public static bool IsValidName(string name) =>
        name.Length is >= 1 and <= 64 && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.');

    static bool IsTaskName(string? name) => name is { Length: >= 1 and <= 64 } && name.All(c => char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c == '_');

    static bool IsJsonObject(string json)
    {
        try { using var doc = JsonDocument.Parse(json); return doc.RootElement.ValueKind == JsonValueKind.Object; }
        catch (JsonException) { return false; }
    }
}

/// <summary>
/// dp: data-parallel replicas (0 = as many as the workers allow); pp: pipeline stages. World = dp·pp, ranks stage-major:
/// rank = stage·dp + replica (the checkpoint file rank of ParallelLayout). schedule: how a stage orders its micro-batches
/// when pp &gt; 1 (Training's TrainingOptions.PipelineSchedule).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record ParallelPlan
{
    /// <summary>1f1b: a forward, then a backward (stage s holds at most pp − s micro-batches); gpipe: all forwards, then all backwards.</summary>
    public static readonly string[] Schedules = ["1f1b", "gpipe"];

    [Id(0)] public int Dp { get; init; }
    [Id(1)] public int Pp { get; init; } = 1;
    [Id(2)] public string Schedule { get; init; } = "1f1b";
    /// <summary>Expert parallelism: the routed experts are split over ep replicas (ep divides dp and n_routed_experts).</summary>
    [Id(3)] public int Ep { get; init; } = 1;
    /// <summary>0: replicated; 1: AdamW state sharded over dp; 2: and the gradient sums; 3: and the parameters.</summary>
    [Id(4)] public int Zero { get; init; }
    /// <summary>
    /// Each rank also keeps its ring neighbour's ZeRO shard (refreshed every step by one extra send), so a single lost rank's
    /// shard survives and the job resumes from live state instead of the committed checkpoint (docs/fault-tolerance.md).
    /// </summary>
    [Id(5)] public bool Redundancy { get; init; }
    /// <summary>
    /// Plain data parallelism (zero 0, pp 1, ep 1): the gradient all-reduce starts during the last micro-batch's backward,
    /// a bucket as soon as its layers' gradients are done, instead of after the backward; the same bits either way. Off by
    /// default: on a 2-core CPU it measured no faster (docs/benchmarks.md); no effect with a single replica.
    /// </summary>
    [Id(7)] public bool OverlapGradientReduction { get; init; }

    /// <summary>The plan's own problems (those that need no other field of the spec), each with its JSON path and the numbers.</summary>
    public IEnumerable<(string Field, string Message)> Problems()
    {
        if (Ep < 1) yield return ("parallel.ep", $"{Ep} must be at least 1 (1: every replica holds every expert)");
        else if (Dp > 0 && Dp % Ep != 0) yield return ("parallel.ep", $"{Ep} must divide dp ({Dp}): the experts are split over ep replicas of each group");
        if (Zero is < 0 or > 3) yield return ("parallel.zero", $"{Zero} must be 0 (replicated), 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters)");
        // Each stage's replicas shard that stage's optimizer state (zero 1), gradient sums (zero 2) and parameters (zero 3), with or without ep.
        // With pp > 1 each stage's replicas keep their neighbours' pieces of the stage's state (with ep, of its expert shards;
        // zero 1 to 3 at ep 1 and zero 0 to 3 at ep 2 tested, bf16 too: LiveShardsPipelineTests, RedundancyPipelineClusterTests).
        if (Redundancy && Zero == 0 && Ep <= 1) yield return ("parallel.redundancy", "true with zero 0 and ep 1: every rank already holds the whole state, expected false, zero 1, 2 or 3, or ep > 1");
        // The overlap all-reduces whole words per bucket; ZeRO reduce-scatters them (zero 3 already per layer, during the
        // backward), a pipeline stage's backward and ep's extra expert terms are not bucketed this way.
        if (OverlapGradientReduction && Zero > 0) yield return ("parallel.overlapGradientReduction", $"true with zero {Zero}: only plain data parallelism's all-reduce is overlapped (zero 3 overlaps its reduce-scatter per layer by itself), expected false or zero 0");
        if (OverlapGradientReduction && Pp > 1) yield return ("parallel.overlapGradientReduction", $"true with pp {Pp}: a pipeline stage's gradient all-reduce is not overlapped, expected false or pp 1");
        if (OverlapGradientReduction && Ep > 1) yield return ("parallel.overlapGradientReduction", $"true with ep {Ep}: the expert-parallel gradient sums are not overlapped, expected false or ep 1");
    }
}

[GenerateSerializer, Immutable]
public sealed record LrSchedule
{
    /// <summary>The trainer's schedules (Training's LrSchedule.Parse): warmup + cosine, warmup-stable-decay, constant.</summary>
    public static readonly string[] Kinds = ["cosine", "wsd", "constant"];

    [Id(0)] public string Kind { get; init; } = "cosine";
    [Id(1)] public double PeakLr { get; init; } = 3e-4;
    [Id(2)] public double MinLr { get; init; } = 3e-5;
    [Id(3)] public int WarmupSteps { get; init; }
    /// <summary>wsd only: the last fraction of the steps over which the learning rate decays to minLr.</summary>
    [Id(4)] public double DecayFraction { get; init; } = 0.2;
}

/// <summary>A committed checkpoint of a job: its step.</summary>
[GenerateSerializer, Immutable]
public sealed record CheckpointRef([property: Id(0)] string Job, [property: Id(1)] long Step);

/// <summary>One thing wrong with a spec: the JSON field path and what was expected.</summary>
[GenerateSerializer, Immutable]
public sealed record SpecProblem([property: Id(0)] string Field, [property: Id(1)] string Message);
