// Training hyper-parameters of one run (model shape lives in DeepSeekConfig), with the reasons for the defaults.
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.Training.Engine;

public sealed record TrainingOptions
{
    public int SeqLen { get; init; } = 128;
    /// <summary>Sequences per optimizer step across all data-parallel ranks; fixed, so a rescale changes accumulation, not the batch.</summary>
    public int GlobalBatch { get; init; } = 16;
    /// <summary>Sequences per forward/backward pass on one rank.</summary>
    public int MicroBatch { get; init; } = 8;
    public long Steps { get; init; } = 600;
    public double Lr { get; init; } = 3e-3;          // tiny models tolerate a high peak; V3 used 2.2e-4 at 671B
    public string Schedule { get; init; } = "cosine";
    /// <summary>
    /// Linear warmup steps. Unset, it is <see cref="DefaultWarmup"/>(Steps) = min(30, Steps / 10), so a short run
    /// (--steps 20) warms up for 2 steps instead of failing; a value set explicitly is checked against Steps as given.
    /// </summary>
    public long WarmupSteps { get => warmupSteps ?? DefaultWarmup(Steps); init => warmupSteps = value; }
    long? warmupSteps;
    public double MinLrRatio { get; init; } = 0.1;
    public double DecayFraction { get; init; } = 0.2; // WSD only
    public double WeightDecay { get; init; } = 0.1;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.95;       // 0.95 as in V3: steadier than 0.999 on spiky MoE gradients
    /// <summary>AdamW's ε (PyTorch's default).</summary>
    public double Epsilon { get; init; } = 1e-8;
    public double ClipNorm { get; init; } = 1.0;
    /// <summary>λ of DeepSeek-V3's MTP loss (0.3 early in V3 training); 0 skips the MTP modules.</summary>
    public double MtpWeight { get; init; } = 0.3;
    /// <summary>γ of the auxiliary-loss-free balancing: bias change per step (V3: 0.001).</summary>
    public double BiasUpdateSpeed { get; init; } = 0.001;
    /// <summary>fp32, or bf16 (bf16 weights and activations, fp32 master weights and moments).</summary>
    public string Precision { get; init; } = "fp32";
    public long Seed { get; init; } = 1234;
    public int EvalEvery { get; init; } = 100;
    public int EvalBatches { get; init; } = 4;
    public int LogEvery { get; init; } = 10;
    public int CheckpointEvery { get; init; }
    /// <summary>cpu, cuda, cuda:N, or auto (CUDA when present).</summary>
    public string Device { get; init; } = "auto";
    /// <summary>
    /// How a pipeline stage orders its micro-batches (pp &gt; 1 only): 1f1b (one forward, one backward: stage s holds at
    /// most pp − s micro-batches' activations) or gpipe (every forward, then every backward: it holds all of them).
    /// </summary>
    public string PipelineSchedule { get; init; } = "1f1b";

    /// <summary>ZeRO stage over the data-parallel ranks: 0 replicated, 1 AdamW state sharded, 2 and the gradient words, 3 and the parameters (docs/parallelism.md).</summary>
    public int Zero { get; init; }

    /// <summary>
    /// ZeRO-3 without ep: each layer's gradients are reduce-scattered as soon as its backward is done, and (CPU
    /// collectives) the next layer's gather is prefetched while this one computes (ZeroParameters.Overlap). Off: the
    /// whole backward's gradients are reduce-scattered after it and each gather waits; the same bits either way (the
    /// bench compares the two).
    /// </summary>
    public bool Zero3Overlap { get; init; } = true;

    /// <summary>
    /// Plain data parallelism (zero 0, ep 1, pp 1): the gradient all-reduce starts during the last micro-batch's backward,
    /// a bucket as soon as its layers' backward is done (OverlappedGradientReduction); off, after the backward. The same
    /// bits either way (the sum is of integers). The job spec's parallel.overlapGradientReduction. Off by default: on the
    /// loaded 2-core VM `bench -- dp-overlap` could not show it faster (medians 0.84–1.31× the after-backward step, single
    /// rounds 0.5–2.3×; the exchange thread competes with the compute for the two cores), and its NCCL side stream has
    /// not run on a GPU yet (docs/parallelism.md, docs/benchmarks.md).
    /// </summary>
    public bool OverlapGradientReduction { get; init; }

    /// <summary>
    /// Where the overlapped exchanges (ZeRO-3's, and the data-parallel all-reduce's) run. Null, always outside tests: by
    /// the collective's device, a thread of their own on a CPU collective, the caller's thread on CUDA (whose default
    /// stream orders them; OrderedExchange.RunsOnThread). A test seam, not an option (no job spec or command line sets
    /// it): false makes a CPU run take the CUDA shape of that code (inline, no prefetch), so what a GPU runs is tested
    /// where no GPU is lent (docs/gpus.md, "CUDA-only code and what covers it").
    /// </summary>
    internal bool? ExchangeThread { get; init; }

    /// <summary>Expert-parallel width: consecutive data-parallel ranks that split the routed experts (docs/parallelism.md).</summary>
    public int Ep { get; init; } = 1;
    /// <summary>Activation recompute: none, full (per decoder layer) or selective (norms, SwiGLU products, MLA up-projections); see ActivationRecompute.</summary>
    public string Recompute { get; init; } = "none";
    /// <summary>
    /// How MoE layers run their routed experts: per-expert (one GEMM chain each), grouped (one batched matmul per
    /// projection, slices padded to the largest load) or auto (grouped on CUDA, per-expert on the CPU); see GroupedExperts.
    /// </summary>
    public string Experts { get; init; } = "auto";

    /// <summary>The values <see cref="PipelineSchedule"/> accepts.</summary>
    public static readonly string[] PipelineSchedules = ["1f1b", "gpipe"];

    /// <summary>30 steps (enough to steady Adam's moments on the tiny presets), but never more than a tenth of the run.</summary>
    public static long DefaultWarmup(long steps) => Math.Clamp(steps / 10, 0, 30);

    public int Accumulation(int worldSize) => GlobalBatch / (worldSize * MicroBatch);

    public IReadOnlyList<string> Problems(int worldSize = 1)
    {
        var p = new List<string>();
        if (SeqLen <= 0) p.Add($"seq_len must be > 0, got {SeqLen}");
        if (MicroBatch <= 0) p.Add($"micro_batch must be > 0, got {MicroBatch}");
        if (GlobalBatch <= 0) p.Add($"global_batch must be > 0, got {GlobalBatch}");
        else if (MicroBatch > 0 && GlobalBatch % (worldSize * MicroBatch) != 0)
            p.Add($"global_batch ({GlobalBatch}) must be a multiple of micro_batch x data-parallel width ({MicroBatch} x {worldSize})");
        if (Steps <= 0) p.Add($"steps must be > 0, got {Steps}");
        if (Lr <= 0) p.Add($"lr must be > 0, got {Lr}");
        if (!(Epsilon > 0)) p.Add($"epsilon must be > 0, got {Epsilon}");
        if (WarmupSteps < 0 || WarmupSteps > Steps) p.Add($"warmup must be between 0 and steps ({Steps}), got {WarmupSteps} (leave it unset for min(30, steps / 10))");
        if (MtpWeight < 0) p.Add($"mtp_weight must be >= 0, got {MtpWeight}");
        if (BiasUpdateSpeed < 0) p.Add($"bias_update_speed must be >= 0, got {BiasUpdateSpeed}");
        if (Precision is not ("fp32" or "bf16")) p.Add($"precision must be fp32 or bf16, got '{Precision}'");
        if (!PipelineSchedules.Contains(PipelineSchedule))
            p.Add($"pipeline_schedule must be one of {string.Join(", ", PipelineSchedules)}, got '{PipelineSchedule}'");
        if (!ActivationRecompute.Modes.Contains(Recompute))
            p.Add($"recompute must be one of {string.Join(", ", ActivationRecompute.Modes)}, got '{Recompute}'");
        if (!GroupedExperts.Modes.Contains(Experts))
            p.Add($"experts must be one of {string.Join(", ", GroupedExperts.Modes)}, got '{Experts}'");
        if (Zero is < 0 or > 3) p.Add($"zero must be 0 to 3, got {Zero}");
        if (Ep < 1 || worldSize % Ep != 0) p.Add($"ep must be at least 1 and divide the data-parallel width {worldSize}, got {Ep}");
        if (EvalEvery < 0 || LogEvery <= 0 || CheckpointEvery < 0) p.Add("eval_every and checkpoint_every must be >= 0 and log_every > 0");
        return p;
    }

    public TrainingOptions Validated(int worldSize = 1)
    {
        var problems = Problems(worldSize);
        if (problems.Count > 0) throw new ArgumentException("Invalid training options: " + string.Join("; ", problems));
        return this;
    }
}
