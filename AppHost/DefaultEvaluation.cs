// How many examples the default job's evaluation tasks score when --eval-limit is not given (auto): as many of each task's
// first examples as keep the evaluation's tokens under a share of the tokens trained between two evaluations. Not the
// scorer: the workers score what the job spec names (docs/evaluation.md; the choice is in docs/decisions.md).
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.AppHost;

public static class DefaultEvaluation
{
    /// <summary>The most examples of each task the default scores (a long run's evaluation is this, as before).</summary>
    public const int MostExamples = 50;
    /// <summary>Below this many examples a task's accuracy is noise (one example moves it by 10 points): the default scores none.</summary>
    public const int FewestExamples = 10;
    /// <summary>
    /// The evaluation's tokens may be at most this share of the tokens trained since the last one. A scored token costs a
    /// forward pass, a trained one about three (forward and backward), so this keeps evaluation near a quarter of the
    /// training compute or less (the bound below counts bytes, never fewer than the tokens).
    /// </summary>
    public const double TokenShare = 0.75;

    /// <summary>The tokens trained between two evaluations: a checkpoint interval's steps (or the whole run's, evaluated only at its end).</summary>
    public static long TrainedTokensPerEvaluation(AppHostOptions o) =>
        (long)(o.CheckpointInterval > 0 ? Math.Min(o.CheckpointInterval, o.Steps) : o.Steps) * o.GlobalBatch * o.SeqLen;

    /// <summary>
    /// <paramref name="options"/> with its evaluation sized: unchanged when --eval-limit was given (0 asks for every example);
    /// otherwise the first N examples of each task, N the most that fits <see cref="TokenShare"/> (at most
    /// <see cref="MostExamples"/>), or no tasks when fewer than <see cref="FewestExamples"/> fit. The note says what was
    /// chosen and how to ask for more; null when the default's full 50 fit.
    /// </summary>
    /// <param name="tasksFolder">Where the shipped tasks are (data/tasks): the workers score the same files.</param>
    public static (AppHostOptions Options, string? Note) Size(AppHostOptions options, string tasksFolder)
    {
        // A study's trials and a pipeline job (which scores no tasks) have no default evaluation to size.
        if (options.EvalLimit is not null || options.EvalTasks.Count == 0 || options.Pp > 1 || options.StudyFile is not null) return (options, null);
        var bounds = options.EvalTasks.Select(t => ExampleTokenBounds(Path.Combine(tasksFolder, t + ".jsonl"), MostExamples)).ToList();
        long budget = (long)(TokenShare * TrainedTokensPerEvaluation(options)), used = 0;
        int n = 0;
        for (; n < MostExamples; n++)
        {
            long next = bounds.Sum(b => n < b.Count ? b[n] : 0);
            if (used + next > budget) break;
            used += next;
        }
        string tasks = string.Join(", ", options.EvalTasks);
        string why = $"3/4 of the {TrainedTokensPerEvaluation(options)} tokens trained between evaluations";
        if (n < FewestExamples)
            return (options with { EvalTasks = [], EvalLimit = 0 },
                    $"evaluation tasks ({tasks}) off for this short run: {n} examples of each fit in {why} (--eval-limit N scores N anyway, 0 every example)");
        return (options with { EvalLimit = n },
                n == MostExamples ? null : $"evaluation tasks ({tasks}): the first {n} examples of each, what fits in {why} (--eval-limit N for N, 0 for every example)");
    }

    /// <summary>
    /// For each of the first <paramref name="count"/> examples of a task file, an upper bound on the tokens its requests feed
    /// the model: byte-level BPE gives every token at least one byte, and each request starts with one prefix token. Multiple
    /// choice: the context once per choice; cloze: context and target; perplexity: the text, and one token of context per window (of at least 32 tokens).
    /// </summary>
    public static List<long> ExampleTokenBounds(string taskFile, int count)
    {
        if (!File.Exists(taskFile)) throw new ArgumentException($"--eval-tasks: no task file {taskFile} (the shipped tasks are in data/tasks)");
        var bounds = new List<long>();
        foreach (var line in File.ReadLines(taskFile))
        {
            if (bounds.Count == count) break;
            if (string.IsNullOrWhiteSpace(line)) continue;
            using var doc = JsonDocument.Parse(line);
            var root = doc.RootElement;
            static long Bytes(JsonElement e) => Encoding.UTF8.GetByteCount(e.GetString() ?? "");
            if (root.TryGetProperty("text", out var text)) { long b = Bytes(text); bounds.Add(b + 1 + b / 32); continue; }
            long context = 1 + (root.TryGetProperty("context", out var c) ? Bytes(c) : 0);
            bounds.Add(root.TryGetProperty("choices", out var choices)
                ? choices.EnumerateArray().Sum(choice => context + Bytes(choice))
                : context + (root.TryGetProperty("target", out var target) ? Bytes(target) : 0));
        }
        return bounds;
    }
}
