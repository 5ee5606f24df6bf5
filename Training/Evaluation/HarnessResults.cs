// Example scores -> task metrics -> the results JSON of lm-evaluation-harness (0.4), so its tooling reads ours.
// Not a scorer. Metric keys are "<metric>,<filter>" with the filter "none"; a metric's standard error is
// "<metric>_stderr,none", "N/A" where the harness has none (the corpus perplexities).
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DeepSeekCluster.Training.Harness;

public sealed record TaskResult(string Name, TaskKind Kind, int Samples, IReadOnlyDictionary<string, double> Metrics, IReadOnlyDictionary<string, double?> Stderr)
{
    /// <summary>The metrics a higher value of which is better (the harness's higher_is_better).</summary>
    public static bool HigherIsBetter(string metric) => metric is "acc" or "acc_norm";
}

public static class HarnessResults
{
    /// <summary>Each task's metrics from the scores of all its examples (in any order, from any number of workers).</summary>
    public static List<TaskResult> Aggregate(IReadOnlyList<EvalTask> tasks, IEnumerable<ExampleScore> scores)
    {
        var byTask = scores.GroupBy(s => s.Task).ToDictionary(g => g.Key, g => g.OrderBy(s => s.Example).ToList());
        var results = new List<TaskResult>();
        for (int t = 0; t < tasks.Count; t++)
        {
            var task = tasks[t];
            var s = byTask.GetValueOrDefault(t) ?? [];
            if (s.Count != task.Examples.Count || s.Select(x => x.Example).Distinct().Count() != s.Count)
                throw new InvalidOperationException($"task {task.Name}: {s.Count} scores for {task.Examples.Count} examples (each example must be scored once)");
            var metrics = new Dictionary<string, double>();
            var stderr = new Dictionary<string, double?>();
            switch (task.Kind)
            {
                case TaskKind.MultipleChoice:
                    (metrics["acc"], stderr["acc"]) = MeanAndStderr(s.Select(x => x.Correct ? 1.0 : 0.0));
                    (metrics["acc_norm"], stderr["acc_norm"]) = MeanAndStderr(s.Select(x => x.CorrectNorm ? 1.0 : 0.0));
                    break;
                case TaskKind.Cloze:
                    // The harness's LAMBADA perplexity: exp of minus the mean per-example log-likelihood. Its stderr is
                    // the delta method's (the harness bootstraps it; the two agree to first order).
                    var (meanLl, llStderr) = MeanAndStderr(s.Select(x => x.LogProb));
                    metrics["perplexity"] = Math.Exp(-meanLl);
                    stderr["perplexity"] = llStderr is { } e ? Math.Exp(-meanLl) * e : null;
                    (metrics["acc"], stderr["acc"]) = MeanAndStderr(s.Select(x => x.Correct ? 1.0 : 0.0));
                    break;
                default:
                    // Corpus perplexities weighted by size, as the harness's wikitext: per token, word and byte.
                    double ll = s.Sum(x => x.LogProb);
                    metrics["perplexity"] = Math.Exp(-ll / s.Sum(x => x.Tokens));
                    metrics["word_perplexity"] = Math.Exp(-ll / s.Sum(x => x.Words));
                    metrics["byte_perplexity"] = Math.Exp(-ll / s.Sum(x => x.Bytes));
                    metrics["bits_per_byte"] = -ll / s.Sum(x => x.Bytes) / Math.Log(2);
                    foreach (var k in metrics.Keys) stderr[k] = null;
                    break;
            }
            results.Add(new TaskResult(task.Name, task.Kind, s.Count, metrics, stderr));
        }
        return results;
    }

    /// <summary>Mean and the standard error of the mean with the sample standard deviation (ddof 1), as the harness's mean_stderr.</summary>
    public static (double Mean, double? Stderr) MeanAndStderr(IEnumerable<double> values)
    {
        var v = values.ToList();
        if (v.Count == 0) return (double.NaN, null);
        double mean = v.Average();
        if (v.Count < 2) return (mean, null);
        double var = v.Sum(x => (x - mean) * (x - mean)) / (v.Count - 1);
        return (mean, Math.Sqrt(var / v.Count));
    }

    /// <summary>The results document, in the harness's layout.</summary>
    public static JsonObject ToJson(IReadOnlyList<TaskResult> results, IReadOnlyList<EvalTask> tasks, string model, double seconds, long tokensScored)
    {
        JsonObject PerTask(Func<TaskResult, JsonNode?> f)
        {
            var o = new JsonObject();
            foreach (var r in results) o[r.Name] = f(r);
            return o;
        }
        return new JsonObject
        {
            ["results"] = PerTask(r =>
            {
                var o = new JsonObject { ["alias"] = r.Name };
                foreach (var (m, v) in r.Metrics)
                {
                    o[$"{m},none"] = Finite(v);
                    o[$"{m}_stderr,none"] = r.Stderr[m] is { } e ? Finite(e) : "N/A";
                }
                return o;
            }),
            ["group_subtasks"] = PerTask(_ => new JsonArray()),
            ["configs"] = PerTask(r =>
            {
                var t = tasks.First(x => x.Name == r.Name);
                return new JsonObject
                {
                    ["task"] = r.Name, ["dataset_path"] = t.Path,
                    ["output_type"] = r.Kind switch { TaskKind.MultipleChoice => "multiple_choice", TaskKind.Cloze => "loglikelihood", _ => "loglikelihood_rolling" },
                    ["num_fewshot"] = 0,
                    ["metric_list"] = new JsonArray(r.Metrics.Keys.Select(m => (JsonNode)new JsonObject { ["metric"] = m, ["higher_is_better"] = TaskResult.HigherIsBetter(m) }).ToArray()),
                };
            }),
            ["versions"] = PerTask(_ => 1.0),
            ["n-shot"] = PerTask(_ => 0),
            ["higher_is_better"] = PerTask(r =>
            {
                var o = new JsonObject();
                foreach (var m in r.Metrics.Keys) o[m] = TaskResult.HigherIsBetter(m);
                return o;
            }),
            ["n-samples"] = PerTask(r => new JsonObject { ["original"] = tasks.First(x => x.Name == r.Name).Examples.Count, ["effective"] = r.Samples }),
            ["config"] = new JsonObject { ["model"] = "deepseek-cluster", ["model_args"] = $"pretrained={model}", ["batch_size"] = null, ["limit"] = null, ["bootstrap_iters"] = 0 },
            ["date"] = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0,
            ["total_evaluation_time_seconds"] = seconds.ToString("F2", System.Globalization.CultureInfo.InvariantCulture),
            ["tokens_scored"] = tokensScored,
        };
    }

    // JSON has no NaN or infinity: a metric that is not finite (no example, a -inf log-likelihood) is written as the harness's "N/A".
    static JsonNode Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : JsonValue.Create("N/A");

    public static string Write(JsonObject results) => results.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
}
