// Expert parallelism in a cluster job: the real Coordinator (in this process) forms dp 4 with ep 2 on four real
// ClusterWorkers over tcp; each rank holds half the routed experts. The job validates on every rank (the MoE layers
// exchange tokens), rank 0 puts the final model, assembled from the committed checkpoint, into the store, and that checkpoint equals, bit for
// bit, the one a one-worker job of the same spec commits: every weight, both AdamW moments, the routing biases. So does
// the same job with ZeRO-1 (each rank also holds a quarter of the optimizer state), and with ZeRO-3 under a memory
// budget that refuses the replicated plan.
using System.Net;
using System.Net.Http.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using Xunit.Abstractions;

namespace DeepSeekCluster.GpuWorker.Tests;

// Alone: the jobs' weights come from torch's one process-wide generator (DeepSeekForCausalLM.FromSeed seeds it under a
// lock), and any model another test class constructs meanwhile draws from that generator too, outside the lock; the
// bit-for-bit comparison of a four-worker and a one-worker job saw those draws (a CI run's step-1 losses differed).
[CollectionDefinition(nameof(ExpertParallelClusterTests), DisableParallelization = true)]
public sealed class ExpertParallelClusterCollection;

[Collection(nameof(ExpertParallelClusterTests))]
public class ExpertParallelClusterTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 3, Workers = 4;
    DataShardsHost Data => fixture.Host;

    // Global batch 8 = 4 ranks x 1 micro-batch of 2 = 1 rank x 4 micro-batches: the exact gradient sums make both the same.
    JobSpec Spec(string name, ParallelPlan parallel, int workers) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 8, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 11, EvalInterval = Steps, CheckpointInterval = 0, Parallel = parallel, MinWorkers = workers, MaxWorkers = workers,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0.5, SamplePrompt = "And God said",
    };

    [Fact]
    public async Task ADp4Ep2JobWithAndWithoutZero1TrainsValidatesOnEveryRankAndCommitsTheOneWorkerJobsCheckpointBitForBit()
    {
        await using var run = await ClusterRun.StartAsync(Data, "ep-cluster");
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < Workers; i++) run.StartWorker($"ep-worker-{i}");

            var ep = Spec("ep-job", new ParallelPlan { Dp = 4, Ep = 2 }, Workers);
            Assert.Empty(ep.Validate());
            var epStatus = await ClusterJobs.RunToCompletion(http, ep, Steps, log);
            var epZero = Spec("ep-zero-job", new ParallelPlan { Dp = 4, Ep = 2, Zero = 1 }, Workers);
            Assert.Empty(epZero.Validate());
            var epZeroStatus = await ClusterJobs.RunToCompletion(http, epZero, Steps, log);
            var one = await ClusterJobs.RunToCompletion(http, Spec("ep-reference", new ParallelPlan { Dp = 1 }, 1), Steps, log);

            // ---- The ep job: formed on four ranks, every sample once, validated, final model from the checkpoint ----
            Assert.Contains(epStatus.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("4 workers"));
            Assert.True(epStatus.Consumption.Complete, $"the ledger is not complete: {epStatus.Consumption}");
            Assert.Equal(((long)Steps * 8, 0L), (epStatus.Consumption.Samples, epStatus.Consumption.Overlaps));
            var validation = Assert.Single(epStatus.ValidationLoss.Where(v => v.Step == Steps).DistinctBy(v => v.Loss));
            Assert.True(validation.Loss is > 0 and < 20, $"validation loss {validation.Loss}");
            string text = log.ToString();
            Assert.Contains("loaded the whole model from committed step 3 (saved as dp 4 x pp 1 x ep 2)", text);
            Assert.Contains("sample: And God said", text);
            Assert.Contains("model saved to the checkpoint store as exports/ep-job/3/hf", text);

            // The same losses step by step, and the same validation (each rank computed it through the exchange).
            Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), epStatus.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
            Assert.Equal(one.ValidationLoss.Single(v => v.Step == Steps).Loss, validation.Loss);
            Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), epZeroStatus.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
            Assert.True(epZeroStatus.Consumption.Complete, $"the ep x zero 1 ledger is not complete: {epZeroStatus.Consumption}");

            // ---- The committed checkpoints, each loaded whole: every tensor bit for bit ----
            var epTensors = await CommittedTensors.LoadWhole(Data, run.Store, "ep-job", ep, Steps, run.Folder("load-ep"));
            var epZeroTensors = await CommittedTensors.LoadWhole(Data, run.Store, "ep-zero-job", ep, Steps, run.Folder("load-ep-zero"));
            var oneTensors = await CommittedTensors.LoadWhole(Data, run.Store, "ep-reference", ep, Steps, run.Folder("load-one"));
            Assert.Equal(oneTensors.Keys.Order(), epTensors.Keys.Order());
            Assert.Contains(oneTensors.Keys, k => k.Contains(".mlp.experts.7.") && k.EndsWith(".exp_avg_sq"));
            Assert.Contains(oneTensors.Keys, k => k.EndsWith("e_score_correction_bias"));
            CommittedTensors.AssertSame(oneTensors, epTensors, "the ep job");
            CommittedTensors.AssertSame(oneTensors, epZeroTensors, "the ep x zero 1 job");
            output.WriteLine($"{oneTensors.Count} tensors equal bit for bit; validation loss {validation.Loss:R}; losses {string.Join(", ", epStatus.Loss.Select(p => p.Loss))}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }

    /// <summary>
    /// ZeRO-3 in a cluster job, under a memory budget the replicated plan exceeds. The one-worker reference trains first
    /// on a worker without a budget, which then leaves. Four workers with Worker:MemoryBudgetBytes set between the
    /// planner's predictions refuse a dp 4 zero 0 job before building anything (the job fails naming the bytes) and
    /// train dp 4 x ep 2 x zero 3 (each layer gathered from the replicas while it runs) within the same budget: every
    /// rank validates, rank 0 assembles the final model from the committed checkpoint, and that checkpoint, the per-step
    /// losses and the validation loss equal the one-worker job's bit for bit.
    /// </summary>
    [Fact]
    public async Task AJobTooBigReplicatedIsRefusedAndTrainsWithZero3AndEpBitForBitTheOneWorkerJob()
    {
        await using var run = await ClusterRun.StartAsync(Data, "zero3-cluster");
        var http = run.Http;
        var log = run.Log;
        try
        {
            run.StartWorker("zero3-reference-worker");
            var one = await ClusterJobs.RunToCompletion(http, Spec("zero3-reference", new ParallelPlan { Dp = 1 }, 1), Steps, log);
            Assert.Equal(HttpStatusCode.Accepted, (await http.PostAsync("/workers/zero3-reference-worker/leave", null)).StatusCode);
            Assert.Equal(0, await run.Running("zero3-reference-worker").WaitAsync(TimeSpan.FromMinutes(1)));
            await InProcessCoordinator.Until(async () => (await http.GetFromJsonAsync<JsonArray>("/workers"))!.All(w => !w!["online"]!.GetValue<bool>()), "the reference worker is offline", log);

            // A budget between what a rank of the replicated plan and of dp 4 x ep 2 x zero 3 is predicted to hold.
            var zero0 = Spec("zero0-job", new ParallelPlan { Dp = 4 }, Workers);
            var zero3 = Spec("zero3-job", new ParallelPlan { Dp = 4, Ep = 2, Zero = 3 }, Workers);
            var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
            var (config, options) = JobPlan.Map(zero0, (int)manifest.VocabSize, 0);
            var inputs = new MemoryInputs(options.Precision, zero0.ActivationCheckpointing, options.MicroBatch, options.SeqLen, options.Accumulation(Workers));
            long replicated = MemoryPlanner.Predict(config, ParallelLayout.Even(Workers, 1, config.NumHiddenLayers), 0, inputs).Total;
            long sharded = MemoryPlanner.PredictAll(config, ParallelLayout.Even(Workers, 1, config.NumHiddenLayers).WithShards(2, 3, config.NRoutedExperts), inputs).Max(m => m.Total);
            output.WriteLine($"predicted per rank: zero 0 {replicated} B, ep 2 x zero 3 {sharded} B");
            Assert.True(sharded < 0.8 * replicated, $"ep 2 x zero 3 is predicted {sharded} B per rank against {replicated} B replicated");
            long budget = (replicated + sharded) / 2;
            for (int i = 0; i < Workers; i++)
                run.StartWorker($"zero3-worker-{i}", settings => settings with { MemoryBudgetBytes = budget });

            Assert.Empty(zero0.Validate());
            var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(zero0), System.Text.Encoding.UTF8, "application/json"));
            Assert.Equal(HttpStatusCode.Created, submitted.StatusCode);
            JobStatus? refused = null;
            await InProcessCoordinator.Until(async () =>
            {
                refused = (await http.GetFromJsonAsync<JobStatus>("/jobs/zero0-job", JobSpecJson.Options))!;
                return refused.State == JobState.Failed;
            }, "the replicated job is refused", log);
            foreach (var part in new[] { "dp 4 x pp 1, ep 1, zero 0", "does not fit", "parameters", "optimizer", $"{RankMemory.Gib(budget)} of Worker:MemoryBudgetBytes" })
                Assert.Contains(part, refused!.Error);
            Assert.Empty(refused!.Loss);
            // The workers say it as a refusal of the user's numbers, without a stack trace.
            Assert.Contains("training refused: ", log.ToString());
            Assert.DoesNotContain(nameof(PlanDoesNotFitException), log.ToString());

            Assert.Empty(zero3.Validate());
            var status = await ClusterJobs.RunToCompletion(http, zero3, Steps, log);
            Assert.Contains(status.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("4 workers"));
            for (int r = 0; r < Workers; r++) // each rank logs its own prediction, not the largest rank's
                Assert.Contains($"[rank {r}] memory plan (fp32, zero 3): rank {r}: ", log.ToString());
            Assert.Contains($"of {RankMemory.Gib(budget)} (Worker:MemoryBudgetBytes)", log.ToString());
            Assert.True(status.Consumption.Complete, $"the ledger is not complete: {status.Consumption}");
            Assert.Equal(((long)Steps * 8, 0L), (status.Consumption.Samples, status.Consumption.Overlaps));
            Assert.Contains("loaded the whole model from committed step 3 (saved as dp 4 x pp 1 x ep 2)", log.ToString());
            Assert.Contains("model saved to the checkpoint store as exports/zero3-job/3/hf", log.ToString());
            Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), status.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
            var validation = Assert.Single(status.ValidationLoss.Where(v => v.Step == Steps).DistinctBy(v => v.Loss));
            Assert.Equal(one.ValidationLoss.Single(v => v.Step == Steps).Loss, validation.Loss);

            var tensors = await CommittedTensors.LoadWhole(Data, run.Store, "zero3-job", zero3, Steps, run.Folder("load-zero3"));
            var oneTensors = await CommittedTensors.LoadWhole(Data, run.Store, "zero3-reference", zero3, Steps, run.Folder("load-one"));
            Assert.Contains(oneTensors.Keys, k => k.Contains(".mlp.experts.7.") && k.EndsWith(".exp_avg_sq"));
            CommittedTensors.AssertSame(oneTensors, tensors, "the zero 3 job");
            output.WriteLine($"{oneTensors.Count} tensors equal bit for bit; validation loss {validation.Loss:R}; losses {string.Join(", ", status.Loss.Select(p => p.Loss))}");
            output.WriteLine($"refused: {refused.Error}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }

    /// <summary>
    /// Expert parallelism inside pipeline stages: dp 2 x pp 2 x ep 2 on four workers (each stage's two replicas are its ep
    /// group) commits the one-worker job's checkpoint bit for bit (unclipped and without MTP, see below). And evalTasks in
    /// a dp 4 x ep 2 job: each ep group
    /// scores one share through its MoE exchange, and the results equal the one-worker job's.
    /// </summary>
    [Fact]
    public async Task ADp2Pp2Ep2JobCommitsTheOneWorkerJobsCheckpointBitForBitAndAnEpJobScoresItsEvalTasksAsOneWorker()
    {
        await using var run = await ClusterRun.StartAsync(Data, "eppp-cluster");
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < Workers; i++) run.StartWorker($"eppp-worker-{i}");

            // Unclipped and without MTP: a stage's share of the norm is summed along the pipeline, and the embedding's
            // gradient from the MTP module comes back along it, both added in another order than one process adds them.
            JobSpec Unclipped(string name, ParallelPlan parallel, int workers) => Spec(name, parallel, workers) with { ClipNorm = 0, MtpWeight = 0 };
            var eppp = Unclipped("eppp-job", new ParallelPlan { Dp = 2, Pp = 2, Ep = 2 }, Workers);
            Assert.Empty(eppp.Validate());
            var epppStatus = await ClusterJobs.RunToCompletion(http, eppp, Steps, log);
            string[] tasks = ["kjv_nextverse", "kjv_cloze"];
            var evaluated = Unclipped("ep-eval-job", new ParallelPlan { Dp = 4, Ep = 2 }, Workers) with { EvalTasks = tasks, EvalLimit = 3 };
            Assert.Empty(evaluated.Validate());
            var evaluatedStatus = await ClusterJobs.RunToCompletion(http, evaluated, Steps, log);
            var one = await ClusterJobs.RunToCompletion(http, Unclipped("eppp-reference", new ParallelPlan { Dp = 1 }, 1) with { EvalTasks = tasks, EvalLimit = 3 }, Steps, log);

            Assert.Contains(epppStatus.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("4 workers"));
            Assert.True(epppStatus.Consumption.Complete, $"the ledger is not complete: {epppStatus.Consumption}");
            Assert.Equal(((long)Steps * 8, 0L), (epppStatus.Consumption.Samples, epppStatus.Consumption.Overlaps));
            string text = log.ToString();
            Assert.Contains("loaded the whole model from committed step 3 (saved as dp 2 x pp 2 x ep 2)", text);
            Assert.Contains("model saved to the checkpoint store as exports/eppp-job/3/hf", text);
            Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), epppStatus.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
            Assert.Equal(one.ValidationLoss.Single(v => v.Step == Steps).Loss, epppStatus.ValidationLoss.Where(v => v.Step == Steps).Select(v => v.Loss).Distinct().Single());

            var epppTensors = await CommittedTensors.LoadWhole(Data, run.Store, "eppp-job", eppp, Steps, run.Folder("load-eppp"));
            var oneTensors = await CommittedTensors.LoadWhole(Data, run.Store, "eppp-reference", eppp, Steps, run.Folder("load-one"));
            Assert.Contains(oneTensors.Keys, k => k.Contains(".mlp.experts.7.") && k.EndsWith(".exp_avg_sq"));
            CommittedTensors.AssertSame(oneTensors, epppTensors, "the dp 2 x pp 2 x ep 2 job");

            // ---- evalTasks in the ep job: the same scores as one worker with the whole model ----
            await InProcessCoordinator.Until(async () =>
                (await http.GetFromJsonAsync<JobStatus>("/jobs/eppp-reference", JobSpecJson.Options))!.Evaluations.Length > 0, "the reference's evaluation", log);
            await InProcessCoordinator.Until(async () =>
                (await http.GetFromJsonAsync<JobStatus>($"/jobs/{evaluated.Name}", JobSpecJson.Options))!.Evaluations.Length > 0, "the ep job's evaluation", log);
            var expectedScores = (await http.GetFromJsonAsync<JobStatus>("/jobs/eppp-reference", JobSpecJson.Options))!.Evaluations.OrderBy(e => (e.Task, e.Metric)).ToList();
            var epScores = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{evaluated.Name}", JobSpecJson.Options))!.Evaluations.OrderBy(e => (e.Task, e.Metric)).ToList();
            Assert.Equal(tasks.Order(), expectedScores.Select(e => e.Task).Distinct().Order());
            Assert.All(expectedScores, e => Assert.Equal(Steps, e.Step));
            Assert.Equal(expectedScores, epScores);
            Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), evaluatedStatus.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
            output.WriteLine($"{oneTensors.Count} tensors equal bit for bit; losses {string.Join(", ", epppStatus.Loss.Select(p => p.Loss))}; " +
                             $"scores {string.Join(", ", epScores.Select(e => $"{e.Task} {e.Metric} {e.Value:R}"))}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }
}
