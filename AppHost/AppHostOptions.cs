// The AppHost's command line: how many workers, the job to run, and whether to stay up after it.
namespace DeepSeekCluster.AppHost;

public sealed record AppHostOptions
{
    public int Workers { get; init; } = 2;
    /// <summary>Where the workers train: cpu, or cuda with one GPU each (auto: cuda when the driver reports a device).</summary>
    public string Device { get; init; } = "auto";
    /// <summary>The CUDA_VISIBLE_DEVICES values the workers get, one each, when <see cref="Device"/> is cuda.</summary>
    public IReadOnlyList<string> Gpus { get; init; } = [];
    /// <summary>The job's maxWorkers: above --workers, workers added with 'add' grow the running job (0: --workers).</summary>
    public int MaxWorkers { get; init; }
    public int JobMaxWorkers => Math.Max(Workers, MaxWorkers);
    /// <summary>Pipeline stages of the default job: each replica's layers are split over this many workers (dp = workers / pp).</summary>
    public int Pp { get; init; } = 1;
    /// <summary>Expert-parallel width of the default job (parallel.ep): the routed experts split over this many replicas.</summary>
    public int Ep { get; init; } = 1;
    /// <summary>ZeRO stage of the default job (parallel.zero): 0 replicated, 1 optimizer state sharded, 2 and the gradients, 3 and the parameters.</summary>
    public int Zero { get; init; }
    /// <summary>parallel.redundancy of the default job: each rank also keeps the pieces of its neighbour's state no other rank holds.</summary>
    public bool Redundancy { get; init; }
    /// <summary>parallel.overlapGradientReduction of the default job: the gradient all-reduce starts during the backward.</summary>
    public bool OverlapReduction { get; init; }
    /// <summary>auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16: the job's precision.</summary>
    public string Precision { get; init; } = "auto";
    /// <summary>none, full or selective: the job's activationCheckpointing.</summary>
    public string Recompute { get; init; } = "none";
    /// <summary>Bytes each worker's rank may hold (Worker__MemoryBudgetBytes); 0: the device's memory.</summary>
    public long MemoryBudget { get; init; }
    public string Preset { get; init; } = "tiny";
    public int Steps { get; init; } = 300;
    public int SeqLen { get; init; } = 128;
    public int GlobalBatch { get; init; } = 16;
    public int MicroBatch { get; init; } = 8;
    public int VocabSize { get; init; } = 2048;
    public int CheckpointInterval { get; init; } = 100;
    /// <summary>Evaluation tasks scored at each checkpoint (JobSpec.evalTasks), the first <see cref="EvalLimit"/> examples of each.</summary>
    public IReadOnlyList<string> EvalTasks { get; init; } = ["kjv_nextverse", "kjv_cloze"];
    /// <summary>JobSpec.evalLimit (0: every example); null: auto, sized to the run by <see cref="DefaultEvaluation.Size"/>.</summary>
    public int? EvalLimit { get; init; }
    public double Lr { get; init; } = 3e-3;
    /// <summary>Exit when the job ends instead of keeping the cluster up until Ctrl+C (for scripts and tests).</summary>
    public bool ExitWhenDone { get; init; }
    /// <summary>
    /// Stop the unfinished jobs an earlier run left in <see cref="RunDir"/> and submit a new default job; without it they
    /// resume and no new job is submitted while one is unfinished (<see cref="EarlierJobs"/>).
    /// </summary>
    public bool Fresh { get; init; }
    /// <summary>Use the folder backends even when Azurite is installed.</summary>
    public bool NoAzurite { get; init; }
    public string RunDir { get; init; } = "";
    /// <summary>A study spec (JSON, docs/studies.md) to run instead of the default job.</summary>
    public string? StudyFile { get; init; }
    /// <summary>Why some of the --workers will not train the default job (its batch allows fewer replicas), or null when all do.</summary>
    public string? IdleWorkers { get; init; }
    /// <summary>How --eval-limit auto sized the default job's evaluation, when it scores fewer than the most (or none); null otherwise.</summary>
    public string? EvaluationNote { get; init; }

    public const string Usage = """
        usage: dotnet run --project AppHost [-- options]
          --workers N            gpu-worker processes to start (default: one per GPU, or 2 without GPUs)
          --device auto|cpu|cuda where workers train (auto: cuda when the NVIDIA driver reports a GPU); on cuda
                                 every worker gets a GPU of its own (CUDA_VISIBLE_DEVICES), since NCCL runs
                                 one rank per GPU, so --workers and --max-workers are at most the GPU count
          --max-workers N        most workers the job may grow to with 'add' (default: --workers)
          --pp N                 pipeline stages: each replica's layers split over N workers (default 1;
                                 --workers must be a multiple of N, and dp = workers / N)
          --ep N                 expert parallelism: routed experts split over N replicas of each pipeline
                                 stage (default 1; N divides dp and the routed experts)
          --zero 0|1|2|3         ZeRO stage: 1 shards AdamW's state over the replicas, 2 also the gradient
                                 sums, 3 also the parameters, gathered per layer (default 0: replicated)
          --redundancy           each rank also keeps what of its neighbour's state no other rank holds (its
                                 ZeRO shard, within its pipeline stage; with --ep its experts' rows; needs
                                 --zero 1-3 or --ep, and room for two replicas): a lost worker's state
                                 survives, and the job resumes from live state, 0 steps redone
          --overlap-reduction    start the gradient all-reduce during the backward, a bucket as soon as its layers
                                 are done (plain dp only: not with --zero 1-3, --pp or --ep; off by default: no
                                 faster on a 2-core CPU, docs/benchmarks.md)
          --precision P          auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (default auto)
          --recompute R          activation recompute: none, full or selective (default none)
          --memory-budget BYTES  bytes one worker's rank may hold (Worker__MemoryBudgetBytes): every worker
                                 refuses a plan predicted to need more before it builds or connects anything,
                                 and the job fails naming the bytes (default: the GPU's memory, or on CPU the
                                 memory available to the worker process)
          --preset NAME          model preset of the default job (tiny)
          --steps N              optimizer steps (300)
          --seq-len N --global-batch N --micro-batch N --vocab-size N --lr X --checkpoint-interval N
          --eval-tasks LIST      tasks scored at each checkpoint, comma-separated, 'none' for none
                                 (kjv_nextverse,kjv_cloze; pp = 1 only)
          --eval-limit N|auto    examples of each task, 0 for every example (the full evaluation); auto (default):
                                 as many as cost at most 3/4 of the tokens trained between evaluations, up to 50,
                                 none when fewer than 10 fit (a short run is not held up scoring noise)
          --run-dir DIR          where state, checkpoints, datasets and the model go (runs/apphost)
          --fresh                stop the unfinished jobs an earlier run left in the run folder, then submit a
                                 new default job (without it they resume, and no new job is submitted)
          --no-azurite           folder storage even when azurite is installed
          --exit-when-done       stop the cluster when the job ends
          --study FILE           run the study in FILE (docs/studies.md) instead of the default job and print
                                 its trials' table; the base job's dataset defaults to the shipped corpus
        While it runs, type 'add' (or '+') to start another worker, 'remove' (or '-') to stop one, 'quit' to stop all.
        With --pp N the job grows or shrinks by whole replicas: N added workers form one more.
        Ctrl+C leaves an unfinished job in the run folder; the next run names it and resumes it (or, with --fresh, stops it).
        """;

    static string OptionOf(string field) => field switch
    {
        "parallel.ep" => "--ep", "parallel.zero" => "--zero", "parallel.redundancy" => "--redundancy", "parallel.overlapGradientReduction" => "--overlap-reduction", "precision" => "--precision", "activationCheckpointing" => "--recompute",
        "modelPreset" => "--preset", "globalBatch" => "--global-batch", "microBatch" => "--micro-batch", "seqLen" => "--seq-len", "steps" => "--steps",
        "checkpointInterval" => "--checkpoint-interval", "evalTasks" => "--eval-tasks", "evalLimit" => "--eval-limit", "maxWorkers" => "--max-workers",
        "schedule.peakLr" or "schedule.minLr" => "--lr", "schedule.warmupSteps" => "--steps",
        _ => "--workers/--pp/--ep/--global-batch/--micro-batch",
    };

    /// <summary>The options of the command line, or null with the exit code when it asked for help (0) or was wrong (2, said why).</summary>
    public static AppHostOptions? FromCommandLine(string[] args, string root, out int exitCode)
    {
        exitCode = 0;
        if (args.Contains("--help") || args.Contains("-h"))
        {
            Console.WriteLine(Usage);
            return null;
        }
        try
        {
            var options = Parse(args, root, LocalGpus.Visible());
            // Sized here rather than in Parse: it reads the shipped task files, which the unit tests' root does not hold.
            var (sized, note) = DefaultEvaluation.Size(options, Path.Combine(root, "data", "tasks"));
            return sized with { EvaluationNote = note };
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"apphost: {e.Message}");
            Console.Error.WriteLine(Usage);
            exitCode = 2;
            return null;
        }
    }

    /// <param name="gpus">The GPUs this machine gives workers (<see cref="LocalGpus.Visible()"/>).</param>
    public static AppHostOptions Parse(string[] args, string root, IReadOnlyList<string> gpus)
    {
        var o = new AppHostOptions { RunDir = Path.Combine(root, "runs", "apphost") };
        bool workersGiven = args.Contains("--workers");
        for (int i = 0; i < args.Length; i++)
        {
            // An option in the value's place ("--ep --steps 4") is a missing value, not the value.
            string Value() => i + 1 < args.Length && !args[i + 1].StartsWith("--", StringComparison.Ordinal) ? args[++i] : throw new ArgumentException($"option {args[i]} needs a value");
            int Int() { var v = Value(); return int.TryParse(v, out var n) && n >= 0 ? n : throw new ArgumentException($"option {args[i - 1]}: '{v}' is not a non-negative integer"); }
            o = args[i] switch
            {
                "--workers" => o with { Workers = Int() },
                "--device" => o with { Device = Value() },
                "--max-workers" => o with { MaxWorkers = Int() },
                "--pp" => o with { Pp = Int() },
                "--ep" => o with { Ep = Int() },
                "--zero" => o with { Zero = Int() },
                "--redundancy" => o with { Redundancy = true },
                "--overlap-reduction" => o with { OverlapReduction = true },
                "--precision" => o with { Precision = Value() },
                "--recompute" => o with { Recompute = Value() },
                "--memory-budget" => o with { MemoryBudget = Value() is var budget && long.TryParse(budget, out var b) && b > 0 ? b : throw new ArgumentException($"option --memory-budget: '{budget}' is not a positive whole number of bytes (for 8 GiB: 8589934592)") },
                "--preset" => o with { Preset = Value() },
                "--steps" => o with { Steps = Int() },
                "--seq-len" => o with { SeqLen = Int() },
                "--global-batch" => o with { GlobalBatch = Int() },
                "--micro-batch" => o with { MicroBatch = Int() },
                "--vocab-size" => o with { VocabSize = Int() },
                "--checkpoint-interval" => o with { CheckpointInterval = Int() },
                "--eval-tasks" => o with { EvalTasks = Value() is "none" ? [] : args[i].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) },
                "--eval-limit" => o with { EvalLimit = Value() is "auto" ? null : int.TryParse(args[i], out var limit) && limit >= 0 ? limit
                                           : throw new ArgumentException($"option --eval-limit: '{args[i]}' is not auto or a non-negative integer") },
                "--lr" => o with { Lr = double.TryParse(Value(), System.Globalization.CultureInfo.InvariantCulture, out var lr) && lr > 0 ? lr : throw new ArgumentException("option --lr needs a positive number") },
                "--run-dir" => o with { RunDir = Path.GetFullPath(Value()) },
                "--exit-when-done" => o with { ExitWhenDone = true },
                "--study" => o with { StudyFile = Path.GetFullPath(Value()) },
                "--fresh" => o with { Fresh = true },
                "--no-azurite" => o with { NoAzurite = true },
                _ => throw new ArgumentException($"unknown option '{args[i]}'"),
            };
        }
        if (o.Pp < 1) throw new ArgumentException("--pp must be at least 1");
        if (o.Ep < 1) throw new ArgumentException("--ep must be at least 1");
        o = o.Device switch
        {
            "cpu" => o with { Gpus = [] },
            "auto" or "cuda" when gpus.Count > 0 => o with { Device = "cuda", Gpus = gpus },
            "auto" => o with { Device = "cpu", Gpus = [] },
            "cuda" => throw new ArgumentException("--device cuda: the NVIDIA driver reports no GPU here (libcuda.so.1 missing, no device, or CUDA_VISIBLE_DEVICES hides them); use --device cpu"),
            _ => throw new ArgumentException($"--device '{o.Device}': expected auto, cpu or cuda"),
        };
        if (o.Device == "cuda")
        {
            string have = $"this machine has {gpus.Count} visible GPU{(gpus.Count == 1 ? "" : "s")} ({string.Join(", ", gpus)})";
            if (!workersGiven) o = o with { Workers = gpus.Count / o.Pp * o.Pp };
            if (o.Workers > gpus.Count)
                throw new ArgumentException($"--workers {o.Workers} needs {o.Workers} GPUs, one per worker (NCCL runs one rank per GPU), and {have}: use --workers {gpus.Count}, or --device cpu");
            if (o.Workers < 1)
                throw new ArgumentException($"--pp {o.Pp} needs {o.Pp} GPUs, one per stage, and {have}: use a smaller --pp, or --device cpu");
            if (o.MaxWorkers > gpus.Count)
                throw new ArgumentException($"--max-workers {o.MaxWorkers} needs as many GPUs, one per worker, and {have}: use --max-workers {gpus.Count} or less, or --device cpu");
        }
        if (o.Workers < 1) throw new ArgumentException("--workers must be at least 1");
        // The job would wait forever for a world it can form: catch it here, where the user typed it.
        if (o.Workers % o.Pp != 0)
            throw new ArgumentException($"--workers {o.Workers} is not a multiple of --pp {o.Pp}: every replica needs {o.Pp} workers, one per stage");
        if (o.MaxWorkers > o.Workers && o.MaxWorkers % o.Pp != 0)
            throw new ArgumentException($"--max-workers {o.MaxWorkers} is not a multiple of --pp {o.Pp}: the job grows by whole replicas of {o.Pp} workers");
        // The spec's own validation names the field: --ep is parallel.ep, --zero parallel.zero, --micro-batch microBatch, and so
        // on; every problem is caught here, before a service starts, rather than when the job is submitted.
        var problems = DefaultJob.Spec(o, "dataset", DateTime.UnixEpoch).Validate();
        if (problems.Count > 0) throw new ArgumentException(string.Join("; ", problems.Select(p => $"{OptionOf(p.Field)} ({p.Field}): {p.Message}")));
        // Not an error (spare workers serve 'add' and other jobs), but the default 16/8 batch gives dp 2 at most, so
        // `--workers 4 --ep 2` would otherwise train on two workers and say nothing of the other two.
        int wantedDp = o.Workers / o.Pp;
        if (DefaultJob.Spec(o, "dataset", DateTime.UnixEpoch).ChooseDataParallel(o.Workers) is { } dp && dp < wantedDp)
        {
            int micros = o.GlobalBatch / Math.Max(1, o.MicroBatch);
            bool fits = o.GlobalBatch % wantedDp == 0 && wantedDp % o.Ep == 0;
            o = o with
            {
                IdleWorkers = $"--workers {o.Workers}: the default job trains on {dp * o.Pp} of them (dp {dp}{(o.Pp > 1 ? $" x pp {o.Pp}" : "")}): dp must divide the {micros} " +
                    $"micro-batch{(micros == 1 ? "" : "es")} of a step (--global-batch {o.GlobalBatch} / --micro-batch {o.MicroBatch}){(o.Ep > 1 ? $" and be a multiple of --ep {o.Ep}" : "")}; " +
                    $"the other {o.Workers - dp * o.Pp} stay idle" + (fits ? $" (--micro-batch {o.GlobalBatch / wantedDp} trains on all {o.Workers})" : ""),
            };
        }
        return o;
    }
}
