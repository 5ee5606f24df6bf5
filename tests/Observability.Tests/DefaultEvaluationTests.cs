// The default job's evaluation sized to the run (--eval-limit auto): a 4-step run scores no tasks and says why, the default
// 300-step run still scores 50 examples of each, and the byte bound it sizes by is never below the tokens the workers score.
using System.Reflection;
using System.Text.Json;
using DeepSeekCluster.AppHost;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;

namespace DeepSeekCluster.Observability.Tests;

public class DefaultEvaluationTests
{
    static readonly string Root = typeof(AppHostOptions).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "RepositoryRoot").Value!;
    static readonly string Tasks = Path.Combine(Root, "data", "tasks");

    static (AppHostOptions Options, string? Note) Sized(params string[] args) => DefaultEvaluation.Size(AppHostOptions.Parse(args, Root, []), Tasks);

    [Fact]
    public void AFourStepRunScoresNoTaskAndSaysHowToAskForThem()
    {
        var (o, note) = Sized("--steps", "4", "--seq-len", "32", "--vocab-size", "512");
        Assert.Empty(DefaultJob.Spec(o, "d", DateTime.UnixEpoch).EvalTasks);
        Assert.NotNull(note);
        Assert.Contains("off for this short run", note);
        Assert.Contains("--eval-limit N", note);
    }

    [Fact]
    public void TheDefaultRunScoresFiftyExamplesOfEachTaskAndAGivenLimitIsKeptEvenZeroForEveryExample()
    {
        var (o, note) = Sized();
        var spec = DefaultJob.Spec(o, "d", DateTime.UnixEpoch);
        Assert.Equal(["kjv_nextverse", "kjv_cloze"], spec.EvalTasks);
        Assert.Equal(50, spec.EvalLimit);
        Assert.Null(note);
        foreach (var (limit, expected) in new[] { ("7", 7), ("0", 0) })
        {
            var given = DefaultJob.Spec(Sized("--steps", "4", "--eval-limit", limit).Options, "d", DateTime.UnixEpoch);
            Assert.Equal(["kjv_nextverse", "kjv_cloze"], given.EvalTasks);
            Assert.Equal(expected, given.EvalLimit);
        }
        Assert.Throws<ArgumentException>(() => Sized("--eval-limit", "all"));
    }

    /// <summary>
    /// 40 steps of 16 x 128 tokens, evaluated once at the end: 61,440 tokens of budget (3/4 of 81,920). The limit is the most
    /// examples whose bounds fit, so one more would not; the bounds are recomputed here from the files' UTF-8 bytes.
    /// </summary>
    [Fact]
    public void AMidSizedRunScoresTheMostExamplesWhoseBoundsFitThreeQuartersOfItsTrainedTokens()
    {
        var (o, note) = Sized("--steps", "40", "--checkpoint-interval", "0");
        int n = o.EvalLimit!.Value;
        Assert.InRange(n, DefaultEvaluation.FewestExamples, DefaultEvaluation.MostExamples - 1);
        Assert.Contains($"the first {n} examples of each", note);
        long Bound(int count) => o.EvalTasks.Sum(t => File.ReadLines(Path.Combine(Tasks, t + ".jsonl")).Take(count).Sum(line =>
        {
            using var doc = JsonDocument.Parse(line);
            var e = doc.RootElement;
            long context = 1 + System.Text.Encoding.UTF8.GetByteCount(e.GetProperty("context").GetString()!);
            return e.TryGetProperty("choices", out var choices)
                ? choices.EnumerateArray().Sum(c => context + System.Text.Encoding.UTF8.GetByteCount(c.GetString()!))
                : context + System.Text.Encoding.UTF8.GetByteCount(e.GetProperty("target").GetString()!);
        }));
        Assert.True(Bound(n) <= 61_440 && Bound(n + 1) > 61_440, $"{n} examples: {Bound(n)} bytes; {n + 1}: {Bound(n + 1)}");
    }

    /// <summary>
    /// The bound sizes the evaluation only if it is never below what the workers score: each request's prefix token, its
    /// context and its continuation, encoded separately (EvalPlan) by a byte-level BPE tokenizer trained as data-shards does.
    /// </summary>
    [Fact]
    public void TheByteBoundIsNeverBelowTheTokensARealTokenizerGivesTheExamples()
    {
        var tokenizer = BpeTokenizer.Train(ShippedCorpus.Documents().Take(300), vocabSize: 512);
        foreach (var task in new[] { "kjv_nextverse", "kjv_cloze" })
        {
            var bounds = DefaultEvaluation.ExampleTokenBounds(Path.Combine(Tasks, task + ".jsonl"), 50);
            var lines = File.ReadLines(Path.Combine(Tasks, task + ".jsonl")).Take(50).ToList();
            for (int i = 0; i < lines.Count; i++)
            {
                using var doc = JsonDocument.Parse(lines[i]);
                var e = doc.RootElement;
                int context = 1 + tokenizer.Encode(e.GetProperty("context").GetString()!).Length;
                long tokens = e.TryGetProperty("choices", out var choices)
                    ? choices.EnumerateArray().Sum(c => (long)context + tokenizer.Encode(c.GetString()!).Length)
                    : context + tokenizer.Encode(e.GetProperty("target").GetString()!).Length;
                Assert.True(tokens <= bounds[i], $"{task} example {i}: {tokens} tokens above the bound {bounds[i]}");
            }
        }
    }
}
