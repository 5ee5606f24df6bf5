// The requests of a set of tasks and the fixed batches they are scored in; a worker's share is a run of whole batches.
// Not a scorer and not the metrics: it turns examples into requests and per-request results back into example scores.
//
// Batches are cut once for the whole run (examples sorted longest first, an example's requests never split), so
// every batch has the same rows whichever worker scores it: 1 and N workers give bit-identical log-likelihoods.
namespace DeepSeekCluster.Training.Harness;

/// <summary>
/// What one example scored. Multiple choice: <see cref="Correct"/> is acc, <see cref="CorrectNorm"/> acc_norm and
/// <see cref="LogProb"/> the gold choice's. Cloze: the target's log-probability and whether it was greedy.
/// Perplexity: the text's summed log-probability and its size in tokens, words and UTF-8 bytes.
/// </summary>
public readonly record struct ExampleScore(int Task, int Example, double LogProb, bool Correct, bool CorrectNorm, long Tokens, long Words, long Bytes);

/// <summary>An example's requests (consecutive in <see cref="EvalPlan.Requests"/>).</summary>
public sealed record ExampleRequests(int Task, int Example, int First, int Count, long Tokens);

public sealed class EvalPlan
{
    public IReadOnlyList<EvalTask> Tasks { get; }
    public IReadOnlyList<LoglikelihoodRequest> Requests => requests;
    public IReadOnlyList<ExampleRequests> Examples { get; }
    /// <summary>Batches of indices into <see cref="Examples"/>, in the order they are scored.</summary>
    public IReadOnlyList<int[]> Batches { get; }

    readonly List<LoglikelihoodRequest> requests;

    EvalPlan(IReadOnlyList<EvalTask> tasks, List<LoglikelihoodRequest> requests, List<ExampleRequests> examples, List<int[]> batches)
        => (Tasks, this.requests, Examples, Batches) = (tasks, requests, examples, batches);

    List<LoglikelihoodRequest> RequestsOf(ExampleRequests ex) => requests.GetRange(ex.First, ex.Count);

    /// <param name="encode">The model's tokenizer, without special tokens.</param>
    /// <param name="prefixToken">The token a document starts after (end-of-text: the trainer joins documents with it).</param>
    /// <param name="batchSize">Requests per forward pass (an example with more forms a batch of its own).</param>
    public static EvalPlan Build(IReadOnlyList<EvalTask> tasks, Func<string, int[]> encode, int prefixToken, int maxLength, int batchSize)
    {
        if (batchSize < 1) throw new ArgumentException($"the evaluation batch size must be at least 1, got {batchSize}");
        var requests = new List<LoglikelihoodRequest>();
        var examples = new List<ExampleRequests>();
        var longest = new List<int>();
        for (int t = 0; t < tasks.Count; t++)
        {
            var task = tasks[t];
            for (int e = 0; e < task.Examples.Count; e++)
            {
                var ex = task.Examples[e];
                int first = requests.Count;
                if (task.Kind == TaskKind.Perplexity) requests.AddRange(RollingWindows(encode(ex.Text!), prefixToken, maxLength));
                else
                {
                    int[] context = [prefixToken, .. encode(ex.Context)];
                    foreach (var choice in ex.Choices)
                    {
                        var cont = encode(choice);
                        if (cont.Length == 0) throw new InvalidDataException($"{task.Path}:{ex.Line}: a continuation encodes to no token");
                        if (cont.Length > maxLength)
                            throw new InvalidDataException($"{task.Path}:{ex.Line}: a continuation of {cont.Length} tokens does not fit the {maxLength}-token scoring window (--max-length)");
                        requests.Add(new LoglikelihoodRequest(context, cont));
                    }
                }
                long tokens = 0;
                int max = 0;
                for (int r = first; r < requests.Count; r++)
                {
                    tokens += Math.Min(requests[r].InputLength, maxLength);
                    max = Math.Max(max, Math.Min(requests[r].InputLength, maxLength));
                }
                longest.Add(max);
                examples.Add(new ExampleRequests(t, e, first, requests.Count - first, tokens));
            }
        }
        // Longest first: a batch's rows have similar lengths (little padding), and the slowest batches start first.
        var order = Enumerable.Range(0, examples.Count)
            .OrderByDescending(i => longest[i])
            .ThenBy(i => i).ToList();
        var batches = new List<int[]>();
        var current = new List<int>();
        int rows = 0;
        foreach (int i in order)
        {
            if (rows > 0 && rows + examples[i].Count > batchSize) { batches.Add([.. current]); current.Clear(); rows = 0; }
            current.Add(i);
            rows += examples[i].Count;
        }
        if (current.Count > 0) batches.Add([.. current]);
        return new EvalPlan(tasks, requests, examples, batches);
    }

    /// <summary>lm-evaluation-harness's rolling windows: disjoint windows of maxLength targets, each with one token of context.</summary>
    static IEnumerable<LoglikelihoodRequest> RollingWindows(int[] tokens, int prefixToken, int maxLength)
    {
        for (int start = 0; start < tokens.Length; start += maxLength)
        {
            int count = Math.Min(maxLength, tokens.Length - start);
            int[] context = start == 0 ? [prefixToken] : [tokens[start - 1]];
            yield return new LoglikelihoodRequest(context, tokens[start..(start + count)]);
        }
    }

    /// <summary>Worker <paramref name="worker"/> of <paramref name="workers"/>: a contiguous run of batches, balanced by tokens.</summary>
    public (int First, int Count) Share(int worker, int workers)
    {
        if (workers < 1 || worker < 0 || worker >= workers) throw new ArgumentException($"worker {worker} of {workers}: expected 0 <= worker < workers");
        var cumulative = new long[Batches.Count + 1];
        for (int b = 0; b < Batches.Count; b++) cumulative[b + 1] = cumulative[b] + Batches[b].Sum(i => Examples[i].Tokens);
        int Boundary(int w) => w == 0 ? 0 : w == workers ? Batches.Count
            : Array.FindIndex(cumulative, c => c * workers >= cumulative[^1] * w) is var k and >= 0 ? k : Batches.Count;
        int first = Boundary(worker), end = Math.Max(first, Boundary(worker + 1));
        return (first, end - first);
    }

    /// <summary>Scores batches [first, first + count) and turns them into example scores.</summary>
    public List<ExampleScore> ScoreBatches(ILoglikelihoodScorer scorer, int first, int count, Action<int>? batchDone = null)
    {
        var scores = new List<ExampleScore>();
        for (int b = first; b < first + count; b++)
        {
            var batch = Batches[b];
            var rows = batch.SelectMany(i => RequestsOf(Examples[i])).ToList();
            var results = scorer.Score(rows);
            if (results.Count != rows.Count) throw new InvalidOperationException($"the scorer returned {results.Count} results for {rows.Count} requests");
            int offset = 0;
            foreach (int i in batch)
            {
                var ex = Examples[i];
                scores.Add(ToScore(ex, results.Skip(offset).Take(ex.Count).ToList()));
                offset += ex.Count;
            }
            batchDone?.Invoke(b);
        }
        return scores;
    }

    /// <summary>Every batch, in one process.</summary>
    public List<ExampleScore> ScoreAll(ILoglikelihoodScorer scorer, Action<int>? batchDone = null) => ScoreBatches(scorer, 0, Batches.Count, batchDone);

    ExampleScore ToScore(ExampleRequests ex, IReadOnlyList<Loglikelihood> results)
    {
        var task = Tasks[ex.Task];
        var example = task.Examples[ex.Example];
        switch (task.Kind)
        {
            case TaskKind.Perplexity:
                var text = example.Text!;
                long tokens = RequestsOf(ex).Sum(r => (long)r.Continuation.Length);
                long words = text.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length;
                return new ExampleScore(ex.Task, ex.Example, results.Sum(r => r.LogProb), false, false, tokens, words, System.Text.Encoding.UTF8.GetByteCount(text));
            case TaskKind.Cloze:
                return new ExampleScore(ex.Task, ex.Example, results[0].LogProb, results[0].IsGreedy, false, requests[ex.First].Continuation.Length, 0, 0);
            default:
                // np.argmax: the first of equal maxima; acc_norm divides by the choice's length in characters, as the harness does.
                int best = 0, bestNorm = 0;
                for (int c = 1; c < results.Count; c++)
                {
                    if (results[c].LogProb > results[best].LogProb) best = c;
                    if (results[c].LogProb / example.Choices[c].Length > results[bestNorm].LogProb / example.Choices[bestNorm].Length) bestNorm = c;
                }
                return new ExampleScore(ex.Task, ex.Example, results[example.Gold].LogProb, best == example.Gold, bestNorm == example.Gold, 0, 0, 0);
        }
    }
}
