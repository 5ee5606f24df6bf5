// Scores a loaded model folder on a set of tasks in one process (`gpu-worker eval`); the cluster job scores the same
// EvalPlan's batches on several workers instead.
using System.Diagnostics;
using System.Text.Json.Nodes;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Harness;

public sealed record EvalOptions
{
    /// <summary>Requests per forward pass.</summary>
    public int BatchSize { get; init; } = 16;
    /// <summary>The first N examples of each task (0: all).</summary>
    public int Limit { get; init; }
    /// <summary>The scoring window in tokens; null: the model's max_position_embeddings.</summary>
    public int? MaxLength { get; init; }
}

public sealed record EvalRun(IReadOnlyList<TaskResult> Results, JsonObject Json, long TokensScored, double Seconds);

public static class ModelEvaluation
{
    /// <summary>The token every example's context starts after: end-of-text, which the trainer puts between documents.</summary>
    public static int PrefixToken(BpeTokenizer tokenizer, string source) =>
        tokenizer.EosTokenId ?? tokenizer.BosTokenId
        ?? throw new InvalidDataException($"{source}: the tokenizer has neither an end-of-text nor a begin-of-text token to start a context after");

    /// <summary>The plan for <paramref name="tasks"/> under a model folder's tokenizer (also what each cluster worker builds).</summary>
    public static EvalPlan Plan(BpeTokenizer tokenizer, string source, IReadOnlyList<EvalTask> tasks, int maxLength, EvalOptions options) =>
        EvalPlan.Build(tasks.Select(t => t.Limited(options.Limit)).ToList(), s => tokenizer.Encode(s), PrefixToken(tokenizer, source), maxLength, options.BatchSize);

    public static EvalRun Run(LoadedModel loaded, IReadOnlyList<EvalTask> tasks, Device device, EvalOptions options, Action<string>? log = null)
    {
        var tokenizer = loaded.Tokenizer
            ?? throw new FileNotFoundException($"Model folder '{loaded.Directory}' has no tokenizer.json: evaluation tasks are text and need the model's tokenizer.");
        if (tokenizer.VocabSize > loaded.Model.Config.VocabSize)
            throw new InvalidDataException($"Model folder '{loaded.Directory}': tokenizer.json has {tokenizer.VocabSize} tokens, config.json's vocab_size is {loaded.Model.Config.VocabSize}");
        var scorer = new ModelScorer(loaded.Model, device, options.MaxLength);
        var plan = Plan(tokenizer, loaded.Directory, tasks, scorer.MaxLength, options);
        log?.Invoke($"eval: {plan.Tasks.Count} task(s), {plan.Examples.Count} examples, {plan.Requests.Count} requests in {plan.Batches.Count} batches");
        var sw = Stopwatch.StartNew();
        var scores = plan.ScoreAll(scorer, b =>
        {
            if (log is not null && (b + 1) % 20 == 0) log($"eval: batch {b + 1}/{plan.Batches.Count}, {scorer.TokensScored / Math.Max(sw.Elapsed.TotalSeconds, 1e-9):F0} tokens/s");
        });
        double seconds = sw.Elapsed.TotalSeconds;
        var results = HarnessResults.Aggregate(plan.Tasks, scores);
        return new EvalRun(results, HarnessResults.ToJson(results, plan.Tasks, loaded.Directory, seconds, scorer.TokensScored), scorer.TokensScored, seconds);
    }

    /// <summary>The harness's results table: one row per task and metric, with its standard error.</summary>
    public static string Table(IReadOnlyList<TaskResult> results)
    {
        var lines = new List<string> { $"{"task",-16} {"metric",-16} {"value",12}   {"stderr",10}" };
        foreach (var r in results)
            foreach (var (m, v) in r.Metrics)
                lines.Add($"{r.Name,-16} {m,-16} {v,12:F4} ± {(r.Stderr[m] is { } e ? e.ToString("F4") : "N/A"),10}");
        return string.Join(Environment.NewLine, lines);
    }
}
