// The AppHost's command line: how many workers, the job to run, and whether to stay up after it.
namespace DeepSeekCluster.AppHost;

public sealed record AppHostOptions
{
    public int Workers { get; init; } = 2;
    /// <summary>The job's maxWorkers: above --workers, workers added with 'add' grow the running job (0: --workers).</summary>
    public int MaxWorkers { get; init; }
    public int JobMaxWorkers => Math.Max(Workers, MaxWorkers);
    public string Preset { get; init; } = "tiny";
    public int Steps { get; init; } = 300;
    public int SeqLen { get; init; } = 128;
    public int GlobalBatch { get; init; } = 16;
    public int MicroBatch { get; init; } = 8;
    public int VocabSize { get; init; } = 2048;
    public int CheckpointInterval { get; init; } = 100;
    public double Lr { get; init; } = 3e-3;
    /// <summary>Exit when the job ends instead of keeping the cluster up until Ctrl+C (for scripts and tests).</summary>
    public bool ExitWhenDone { get; init; }
    /// <summary>Use the folder backends even when Azurite is installed.</summary>
    public bool NoAzurite { get; init; }
    public string RunDir { get; init; } = "";

    public const string Usage = """
        usage: dotnet run --project AppHost [-- options]
          --workers N            gpu-worker processes to start (default 2)
          --max-workers N        most workers the job may grow to with 'add' (default: --workers)
          --preset NAME          model preset of the default job (tiny)
          --steps N              optimizer steps (300)
          --seq-len N --global-batch N --micro-batch N --vocab-size N --lr X --checkpoint-interval N
          --run-dir DIR          where state, checkpoints, datasets and the model go (runs/apphost)
          --no-azurite           folder storage even when azurite is installed
          --exit-when-done       stop the cluster when the job ends
        While it runs, type 'add' (or '+') to start another worker, 'remove' (or '-') to stop one, 'quit' to stop all.
        """;

    public static AppHostOptions Parse(string[] args, string root)
    {
        var o = new AppHostOptions { RunDir = Path.Combine(root, "runs", "apphost") };
        for (int i = 0; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"option {args[i]} needs a value");
            int Int() { var v = Value(); return int.TryParse(v, out var n) && n >= 0 ? n : throw new ArgumentException($"option {args[i - 1]}: '{v}' is not a non-negative integer"); }
            o = args[i] switch
            {
                "--workers" => o with { Workers = Int() },
                "--max-workers" => o with { MaxWorkers = Int() },
                "--preset" => o with { Preset = Value() },
                "--steps" => o with { Steps = Int() },
                "--seq-len" => o with { SeqLen = Int() },
                "--global-batch" => o with { GlobalBatch = Int() },
                "--micro-batch" => o with { MicroBatch = Int() },
                "--vocab-size" => o with { VocabSize = Int() },
                "--checkpoint-interval" => o with { CheckpointInterval = Int() },
                "--lr" => o with { Lr = double.TryParse(Value(), System.Globalization.CultureInfo.InvariantCulture, out var lr) && lr > 0 ? lr : throw new ArgumentException("option --lr needs a positive number") },
                "--run-dir" => o with { RunDir = Path.GetFullPath(Value()) },
                "--exit-when-done" => o with { ExitWhenDone = true },
                "--no-azurite" => o with { NoAzurite = true },
                _ => throw new ArgumentException($"unknown option '{args[i]}'"),
            };
        }
        if (o.Workers < 1) throw new ArgumentException("--workers must be at least 1");
        return o;
    }
}
