// Evaluation tasks end to end in one process: the shipped files, the metrics of known models, the real model's
// log-likelihoods against an independent float64 computation, the work split, the results JSON, bad input.
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Collectives;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Harness;

public class EvaluationTaskTests
{
    // A word-level test tokenizer: each word with its leading space is one of 256 tokens (by a stable hash), so
    // sequences stay short on CPU; 256 is the end-of-text token a context starts after.
    const int Vocab = 257, Prefix = 256;
    static int[] Words(string s) =>
        System.Text.RegularExpressions.Regex.Matches(s, @"\s*\S+|\s+").Select(m => (int)(StableHash.OfText(m.Value, 1) % 256)).ToArray();

    static DeepSeekConfig Micro => DeepSeekConfig.Tiny(Vocab) with
    {
        HiddenSize = 32, IntermediateSize = 64, MoeIntermediateSize = 16, NumHiddenLayers = 2, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 16, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 8, MaxPositionEmbeddings = 160,
    };

    static DeepSeekForCausalLM MicroModel(bool uniform = false)
    {
        manual_seed(7);
        var model = new DeepSeekForCausalLM(Micro).InitializeWeights();
        // A zero output head makes every logit 0: the uniform distribution over the vocabulary, whatever the input.
        if (uniform) using (no_grad()) model.lm_head.weight!.zero_();
        return model;
    }

    static EvalTask Shipped(string name, int limit) => EvalTask.Resolve(name).Limited(limit);

    [Fact]
    public void TheShippedTasksAreWhatTheGeneratorMakesFromTheHeldOutChapters()
    {
        var dir = Directory.CreateTempSubdirectory("tasks-").FullName;
        try
        {
            var chapters = TaskMaker.HeldOutChapters(ShippedCorpus.Documents());
            Assert.InRange(chapters.Count, 40, 100); // 5% of 1,189 chapters
            foreach (var path in TaskMaker.Write(dir, chapters))
                Assert.True(File.ReadAllBytes(path).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(EvalTask.LocateShipped(), Path.GetFileName(path)))),
                            $"{Path.GetFileName(path)} differs from the shipped file: run 'gpu-worker make-tasks'");
            var next = EvalTask.Resolve(TaskMaker.NextVerse);
            Assert.Equal(TaskKind.MultipleChoice, next.Kind);
            Assert.All(next.Examples, e => Assert.Equal(4, e.Choices.Count));
            // Gold positions are spread over the four slots (chance is 1/4 whatever the tie-break).
            Assert.All(Enumerable.Range(0, 4), g => Assert.InRange(next.Examples.Count(e => e.Gold == g), next.Examples.Count / 8, next.Examples.Count / 2));
            Assert.Equal(TaskKind.Cloze, EvalTask.Resolve(TaskMaker.Cloze).Kind);
            Assert.Equal(chapters, EvalTask.Resolve(TaskMaker.HeldOut).Examples.Select(e => e.Text));
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>Knows the gold continuations and gives them probability 1, everything else e^-20 a token.</summary>
    sealed class GoldPreferringScorer(HashSet<string> gold) : ILoglikelihoodScorer
    {
        public int MaxLength => 1 << 20;
        public static string Key(IEnumerable<int> context, IEnumerable<int> continuation) => string.Join(",", context) + "|" + string.Join(",", continuation);
        public IReadOnlyList<Loglikelihood> Score(IReadOnlyList<LoglikelihoodRequest> requests) =>
            requests.Select(r => gold.Contains(Key(r.Context, r.Continuation)) ? new Loglikelihood(0, true) : new Loglikelihood(-20.0 * r.Continuation.Length, false)).ToList();
    }

    [Fact]
    public void AModelThatAlwaysPrefersTheGoldChoiceScoresOne()
    {
        var tasks = new[] { Shipped(TaskMaker.NextVerse, 100), Shipped(TaskMaker.Cloze, 100) };
        var gold = tasks.SelectMany(t => t.Examples).Select(e => GoldPreferringScorer.Key([Prefix, .. Words(e.Context)], Words(e.Choices[e.Gold]))).ToHashSet();
        var plan = EvalPlan.Build(tasks, Words, Prefix, 1 << 20, batchSize: 16);
        var results = HarnessResults.Aggregate(plan.Tasks, plan.ScoreAll(new GoldPreferringScorer(gold)));
        Assert.Equal(1.0, results[0].Metrics["acc"]);
        Assert.Equal(1.0, results[0].Metrics["acc_norm"]);
        Assert.Equal(0.0, results[0].Stderr["acc"]);
        Assert.Equal(1.0, results[1].Metrics["acc"]);
        Assert.Equal(1.0, results[1].Metrics["perplexity"]);
    }

    [Fact]
    public void AUniformModelScoresChance()
    {
        using var model = MicroModel(uniform: true);
        var tasks = new[] { Shipped(TaskMaker.NextVerse, 40), Shipped(TaskMaker.HeldOut, 1) };
        var plan = EvalPlan.Build(tasks, Words, Prefix, Micro.MaxPositionEmbeddings, batchSize: 16);
        var results = HarnessResults.Aggregate(plan.Tasks, plan.ScoreAll(new ModelScorer(model, CPU)));

        // Uniform: a choice's log-likelihood is -n ln V for its n tokens, so the argmax is the first of the shortest
        // choices; the gold verse is that one about a quarter of the time.
        var mc = tasks[0].Examples;
        double expected = mc.Count(e => e.Choices.Select((c, i) => (Words(c).Length, i)).Min().i == e.Gold) / (double)mc.Count;
        Assert.Equal(expected, results[0].Metrics["acc"], 12);
        Assert.InRange(results[0].Metrics["acc"], 0.25 - 3 * results[0].Stderr["acc"]!.Value, 0.25 + 3 * results[0].Stderr["acc"]!.Value);
        // The corpus perplexity of the uniform distribution is the vocabulary size.
        Assert.Equal(Vocab, results[1].Metrics["perplexity"], 3);
        var text = tasks[1].Examples[0].Text!;
        Assert.Equal(Words(text).Length * Math.Log2(Vocab) / Encoding.UTF8.GetByteCount(text), results[1].Metrics["bits_per_byte"], 6);
    }

    [Fact]
    public void TheModelsLogLikelihoodsMatchAnIndependentFloat64Computation()
    {
        using var model = MicroModel();
        var tasks = new[] { Shipped(TaskMaker.NextVerse, 3), Shipped(TaskMaker.Cloze, 4) };
        var plan = EvalPlan.Build(tasks, Words, Prefix, Micro.MaxPositionEmbeddings, batchSize: 8); // padded batches of unequal rows
        var scorer = new ModelScorer(model, CPU);
        var scores = plan.ScoreAll(scorer);
        model.eval();
        using var noGrad = no_grad();
        foreach (var s in scores)
        {
            var ex = plan.Examples.Single(x => x.Task == s.Task && x.Example == s.Example);
            var example = plan.Tasks[s.Task].Examples[s.Example];
            var lls = plan.Requests.Skip(ex.First).Take(ex.Count).Select(r => Reference(model, r, Micro.MaxPositionEmbeddings)).ToList();
            Assert.Equal(lls[example.Gold].LogProb, s.LogProb, 3);
            if (plan.Tasks[s.Task].Kind == TaskKind.Cloze) Assert.Equal(lls[0].Greedy, s.Correct);
            else
            {
                int best = lls.Select((l, i) => (l.LogProb, -i)).Max().Item2 * -1;
                Assert.Equal(best == example.Gold, s.Correct);
            }
        }
        Assert.Equal(plan.Requests.Sum(r => (long)Math.Min(r.InputLength, Micro.MaxPositionEmbeddings)), scorer.TokensScored);
    }

    /// <summary>One request alone, unpadded: float64 log-softmax of its logits, summed over the continuation.</summary>
    static (double LogProb, bool Greedy) Reference(DeepSeekForCausalLM model, LoglikelihoodRequest r, int maxLength)
    {
        var all = r.Context.Concat(r.Continuation).ToArray();
        var input = all[..^1].TakeLast(maxLength).ToArray();
        var logits = model.Forward(tensor(input.Select(i => (long)i).ToArray(), [1, input.Length])).Logits_BTV[0].to_type(ScalarType.Float64).data<double>().ToArray();
        double sum = 0;
        bool greedy = true;
        for (int c = 0; c < r.Continuation.Length; c++)
        {
            int p = input.Length - r.Continuation.Length + c;
            var row = logits.AsSpan(p * Vocab, Vocab).ToArray();
            double max = row.Max(), lse = max + Math.Log(row.Sum(x => Math.Exp(x - max)));
            sum += row[r.Continuation[c]] - lse;
            greedy &= Array.IndexOf(row, max) == r.Continuation[c];
        }
        return (sum, greedy);
    }

    [Fact]
    public void OneAndThreeWorkersGiveTheSameScores()
    {
        var tasks = new[] { Shipped(TaskMaker.NextVerse, 5), Shipped(TaskMaker.Cloze, 5), Shipped(TaskMaker.HeldOut, 1) };
        var plan = EvalPlan.Build(tasks, Words, Prefix, Micro.MaxPositionEmbeddings, batchSize: 8);
        // A copy of the model per worker (the same seed gives the same weights), made before the workers' threads start.
        var models = Enumerable.Range(0, 3).Select(_ => MicroModel()).ToArray();
        try
        {
            var one = plan.ScoreAll(new ModelScorer(models[0], CPU));
            var shares = Enumerable.Range(0, 3).Select(w => plan.Share(w, 3)).ToList();
            Assert.Equal(plan.Batches.Count, shares.Sum(s => s.Count));
            Assert.All(shares, s => Assert.True(s.Count > 0));
            // Three ranks of a real tcp collective: each scores its share, then every rank gathers all the scores.
            var gathered = RankGroup.Run(3, c =>
            {
                var (first, count) = plan.Share(c.Rank, c.WorldSize);
                return ScoreExchange.AllGather(plan, plan.ScoreBatches(new ModelScorer(models[c.Rank], CPU), first, count), c);
            }, limit: TimeSpan.FromMinutes(2));
            foreach (var three in gathered)
            {
                Assert.Equal(one.OrderBy(s => (s.Task, s.Example)), three);
                Assert.Equal(HarnessResults.Write(Stable(plan, one)), HarnessResults.Write(Stable(plan, three)));
            }
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    static JsonObject Stable(EvalPlan plan, List<ExampleScore> scores)
    {
        var json = HarnessResults.ToJson(HarnessResults.Aggregate(plan.Tasks, scores), plan.Tasks, "m", 0, 0);
        json.Remove("date");
        return json;
    }

    [Fact]
    public void ResultsParseAsTheHarnesssJson()
    {
        var tasks = new[] { Shipped(TaskMaker.NextVerse, 20), Shipped(TaskMaker.Cloze, 20), Shipped(TaskMaker.HeldOut, 2) };
        var plan = EvalPlan.Build(tasks, Words, Prefix, 160, batchSize: 16);
        var gold = new GoldPreferringScorer([]);
        var text = HarnessResults.Write(HarnessResults.ToJson(HarnessResults.Aggregate(plan.Tasks, plan.ScoreAll(gold)), plan.Tasks, "dir", 1.5, 10));
        using var doc = JsonDocument.Parse(text);
        var root = doc.RootElement;
        foreach (var key in new[] { "results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config" })
            Assert.True(root.TryGetProperty(key, out _), $"no \"{key}\"");
        var expected = new Dictionary<string, string[]>
        {
            [TaskMaker.NextVerse] = ["acc", "acc_norm"], [TaskMaker.Cloze] = ["perplexity", "acc"],
            [TaskMaker.HeldOut] = ["perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"],
        };
        foreach (var (task, metrics) in expected)
        {
            var r = root.GetProperty("results").GetProperty(task);
            // As lm_eval.utils.make_table reads a task: "metric,filter" keys, each with "metric_stderr,filter" beside it.
            var seen = new List<string>();
            foreach (var p in r.EnumerateObject())
            {
                if (p.Name == "alias") continue;
                var (m, f) = (p.Name.Split(',')[0], p.Name.Split(',')[1]);
                Assert.Equal("none", f);
                if (m.EndsWith("_stderr", StringComparison.Ordinal)) continue;
                seen.Add(m);
                Assert.Equal(JsonValueKind.Number, p.Value.ValueKind);
                var se = r.GetProperty($"{m}_stderr,{f}");
                Assert.True(se.ValueKind == JsonValueKind.Number || se.GetString() == "N/A");
                Assert.Equal(m.StartsWith("acc", StringComparison.Ordinal), root.GetProperty("higher_is_better").GetProperty(task).GetProperty(m).GetBoolean());
            }
            Assert.Equal(metrics.Order(), seen.Order());
            Assert.Equal(plan.Tasks.Single(t => t.Name == task).Examples.Count, root.GetProperty("n-samples").GetProperty(task).GetProperty("effective").GetInt32());
        }
    }
}
