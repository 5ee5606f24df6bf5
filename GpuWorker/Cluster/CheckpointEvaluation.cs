// The job's evaluation tasks (JobSpec.evalTasks) scored at each scheduled checkpoint step by every replica of the job:
// each scores its share of the plan's batches with its own copy of the model (with ep, each ep group one share through
// its MoE exchange), the shares are gathered over the job's ring, and rank 0 reports the results
// (lm-evaluation-harness JSON) on the step's report. Not the validation loss.
using System.Diagnostics;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

sealed class CheckpointEvaluation(RunContext run, JobPlan plan, GetTokenizerReply tokenizerReply, ICollective ring, Device device)
{
    EvalPlan? tasks;
    bool refused;

    /// <summary>Whether <paramref name="step"/> is evaluated: the scheduled checkpoint steps, the same on every rank (a
    /// checkpoint asked for by the Coordinator reaches the ranks at different steps, so it is not one).</summary>
    public bool Due(long step) => !refused && plan.Spec.EvalTasks.Length > 0 && run.Assignment.PpSize == 1 &&
        (plan.Options.CheckpointEvery > 0 && step % plan.Options.CheckpointEvery == 0 || step == plan.Options.Steps);

    /// <summary>Scores this rank's share, gathers everyone's; the results JSON on rank 0, null elsewhere.</summary>
    public string? Run(DeepSeekForCausalLM model, long step)
    {
        var a = run.Assignment;
        if (tasks is null)
        {
            // The plan is the same on every rank (the same files, tokenizer and window), so a task that cannot be planned
            // fails on all of them alike and none enters the exchange: the training goes on, the reason is logged.
            try { tasks = Plan(); }
            catch (Exception e) when (e is InvalidDataException or ArgumentException or FileNotFoundException or DirectoryNotFoundException)
            {
                refused = true;
                run.Log($"evaluation tasks {string.Join(", ", plan.Spec.EvalTasks)} are not scored in this run: {e.Message}");
                return null;
            }
        }
        var scorer = new ModelScorer(model, device, Window);
        // With ep > 1 a replica holds 1/ep of the experts: the ranks of an ep group score one share together (the same
        // batches, so their MoE layers exchange tokens in step, as in training) and its first rank reports the scores.
        // Groups never exchange with each other (zero rows), so their shares need not hold as many batches.
        int ep = plan.Options.Ep;
        var (first, count) = tasks.Share(a.DpRank / ep, a.DpSize / ep);
        var clock = Stopwatch.StartNew();
        var scored = tasks.ScoreBatches(scorer, first, count);
        var mine = a.DpRank % ep == 0 ? scored : [];
        double seconds = clock.Elapsed.TotalSeconds;
        run.Metrics?.EvaluationTokens(a.JobId, run.WorkerId, scorer.TokensScored, seconds);
        var all = ScoreExchange.AllGather(tasks, mine, ring);
        if (a.Rank != 0) return null;
        var results = HarnessResults.Aggregate(tasks.Tasks, all);
        foreach (var r in results) run.Metrics?.EvaluationResult(a.JobId, run.WorkerId, r);
        run.Log($"evaluation at step {step}: " + string.Join("; ", results.Select(r =>
            $"{r.Name} " + string.Join(", ", r.Metrics.Select(m => $"{m.Key} {m.Value:F4}")))) +
            $" ({scorer.TokensScored} tokens on this rank in {seconds:F1} s)");
        var json = HarnessResults.ToJson(results, tasks.Tasks, $"{a.JobId}@{step}", seconds, scorer.TokensScored);
        return json.ToJsonString();
    }

    EvalPlan Plan()
    {
        var tokenizer = BpeTokenizer.FromJson(tokenizerReply.TokenizerJson, $"dataset {plan.Spec.Dataset}");
        var loaded = plan.Spec.EvalTasks.Select(name => EvalTask.Resolve(name).Limited(plan.Spec.EvalLimit)).ToList();
        return EvalPlan.Build(loaded, s => tokenizer.Encode(s), ModelEvaluation.PrefixToken(tokenizer, $"dataset {plan.Spec.Dataset}"),
                              Window, batchSize: Math.Max(1, plan.Options.MicroBatch));
    }

    /// <summary>The scoring window: the model's positions, so that a verse longer than the training sequences still fits.</summary>
    int Window => plan.Config.MaxPositionEmbeddings;
}
