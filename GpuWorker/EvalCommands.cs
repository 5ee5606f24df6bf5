// The evaluation verbs: score a model folder on tasks (eval), and make the shipped tasks from the corpus (make-tasks).
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.GpuWorker;

public static class EvalCommands
{
    public const string Usage = """
          gpu-worker eval --model DIR --tasks NAME_OR_FILE[,...] [--out results.json] [--limit N]
                          [--batch-size N] [--max-length N] [--device auto|cpu|cuda]
              Scores a model folder (config.json + *.safetensors + tokenizer.json) on JSONL tasks: the shipped
              kjv_cloze, kjv_nextverse and kjv_heldout, or .jsonl files (docs/evaluation.md). Prints the results
              table; --out writes lm-evaluation-harness's results JSON.
          gpu-worker make-tasks [--corpus FILE] [--out data/tasks] [--max-items N] [--validation-fraction X] [--seed N]
              Writes the shipped tasks from the chapters a prepared dataset of the corpus holds out.
        """;

    public static int Eval(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string>());
        var dir = cl.String("model") ?? throw new ArgumentException("option --model DIR is required (a folder with config.json, model.safetensors and tokenizer.json)");
        var names = cl.Strings("tasks").SelectMany(t => t.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToList();
        if (names.Count == 0) throw new ArgumentException("option --tasks is required: task names (kjv_cloze, kjv_nextverse, kjv_heldout) or .jsonl files");
        var options = new EvalOptions
        {
            BatchSize = cl.Get("batch-size", 16), Limit = cl.Get("limit", 0),
            MaxLength = cl.String("max-length") is null ? null : cl.Get("max-length", 0),
        };
        if (options.BatchSize < 1) throw new ArgumentException($"option --batch-size: expected at least 1, got {options.BatchSize}");
        if (options.MaxLength is < 2) throw new ArgumentException($"option --max-length: expected at least 2 tokens, got {options.MaxLength}");
        var output = cl.String("out");
        var device = StandaloneRun.ResolveDevice(cl.String("device") ?? "auto");
        cl.RejectUnknown();

        var tasks = names.Select(n => EvalTask.Resolve(n)).ToList(); // before the model: a typo fails fast
        if (tasks.Select(t => t.Name).Distinct().Count() != tasks.Count) throw new ArgumentException($"option --tasks names a task twice: {string.Join(", ", names)}");
        var loaded = HfModelFolder.Load(dir, device);
        using var model = loaded.Model;
        var run = ModelEvaluation.Run(loaded, tasks, device, options, Console.WriteLine);
        Console.WriteLine(ModelEvaluation.Table(run.Results));
        Console.WriteLine($"scored {run.TokensScored:N0} tokens in {run.Seconds:F1} s ({run.TokensScored / Math.Max(run.Seconds, 1e-9):F0} tokens/s)");
        if (output is not null)
        {
            File.WriteAllText(output, HarnessResults.Write(run.Json));
            Console.WriteLine($"results: {output}");
        }
        return 0;
    }

    public static int MakeTasks(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string>());
        var corpus = ShippedCorpus.Locate(cl.String("corpus"));
        var output = cl.String("out") ?? EvalTask.RepositoryFolder;
        int maxItems = cl.Get("max-items", 500);
        double fraction = cl.Get("validation-fraction", TaskMaker.DefaultValidationFraction);
        ulong seed = cl.Get("seed", 21UL);
        cl.RejectUnknown();
        if (maxItems < 1) throw new ArgumentException($"option --max-items: expected at least 1, got {maxItems}");
        if (!(fraction > 0 && fraction < 1)) throw new ArgumentException($"option --validation-fraction: expected a number in (0, 1), got {fraction}");
        var chapters = TaskMaker.HeldOutChapters(ShippedCorpus.Documents(corpus), fraction);
        Console.WriteLine($"{chapters.Count} held-out chapters of {corpus}");
        foreach (var path in TaskMaker.Write(output, chapters, maxItems, seed))
            Console.WriteLine($"{path}: {File.ReadLines(path).Count()} examples");
        return 0;
    }
}
