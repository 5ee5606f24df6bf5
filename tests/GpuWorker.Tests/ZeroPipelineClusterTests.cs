// ZeRO inside pipeline stages in a cluster job: the real Coordinator (in this process) forms dp 2 x pp 2 with zero 1,
// dp 2 x pp 2 with zero 3, and dp 2 x pp 2 x ep 2 with zero 2 and with zero 3, on four real ClusterWorkers over tcp; each stage's two
// replicas hold half of that stage's replicated optimizer state (zero 3: and half of its parameters, each layer gathered
// while it runs; under ep, each its half of the routed experts with their whole state). The jobs complete with a complete ledger, validate, and commit, bit for bit, the checkpoint a one-worker job of the
// same spec commits: every weight, both AdamW moments, the routing biases.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using Xunit.Abstractions;

namespace DeepSeekCluster.GpuWorker.Tests;

// In ExpertParallelClusterTests' collection, for its reason: the bit-for-bit comparison needs torch's process-wide
// generator to itself while the jobs build their models.
[Collection(nameof(ExpertParallelClusterTests))]
public class ZeroPipelineClusterTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 3, Workers = 4;
    DataShardsHost Data => fixture.Host;

    // Global batch 8 = 2 replicas x 2 micro-batches of 2 = 1 rank x 4 micro-batches: the exact gradient sums make both the
    // same. Unclipped and without MTP: a stage's share of the norm is summed along the pipeline, and the embedding's
    // gradient from the MTP module comes back along it, both added in another order than one process adds them.
    JobSpec Spec(string name, ParallelPlan parallel, int workers) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 8, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 11, EvalInterval = Steps, CheckpointInterval = 0, Parallel = parallel, MinWorkers = workers, MaxWorkers = workers,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0, MtpWeight = 0,
    };

    [Fact]
    public async Task Dp2Pp2JobsWithZero1Zero3AndEp2Zero2Zero3CommitTheOneWorkerJobsCheckpointBitForBit()
    {
        await using var run = await ClusterRun.StartAsync(Data, "zero-pp-cluster");
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < Workers; i++) run.StartWorker($"zero-pp-worker-{i}");
            await run.Online(Workers); // a job submitted before every worker registered would form on fewer and re-form

            var jobs = new[] { (Zero: 1, Ep: 1), (Zero: 3, Ep: 1), (Zero: 2, Ep: 2), (Zero: 3, Ep: 2) }
                .Select(j => (j.Zero, j.Ep, Spec: Spec($"zero{j.Zero}-ep{j.Ep}-pp-job", new ParallelPlan { Dp = 2, Pp = 2, Ep = j.Ep, Zero = j.Zero }, Workers))).ToList();
            var statuses = new List<JobStatus>();
            foreach (var (_, _, spec) in jobs)
            {
                Assert.Empty(spec.Validate());
                statuses.Add(await ClusterJobs.RunToCompletion(http, spec, Steps, log));
            }
            var one = await ClusterJobs.RunToCompletion(http, Spec("zero-pp-reference", new ParallelPlan { Dp = 1 }, 1), Steps, log);
            var oneTensors = await CommittedTensors.LoadWhole(Data, run.Store, "zero-pp-reference", jobs[0].Spec, Steps, run.Folder("load-one"));
            Assert.Contains(oneTensors.Keys, k => k.Contains(".mlp.experts.") && k.EndsWith(".exp_avg_sq"));
            Assert.Contains(oneTensors.Keys, k => k.EndsWith("e_score_correction_bias"));
            string text = log.ToString();

            foreach (var ((zero, ep, spec), status) in jobs.Zip(statuses))
            {
                Assert.Contains(status.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("4 workers"));
                Assert.True(status.Consumption.Complete, $"zero {zero} ep {ep}: the ledger is not complete: {status.Consumption}");
                Assert.Equal(((long)Steps * 8, 0L), (status.Consumption.Samples, status.Consumption.Overlaps));
                Assert.Contains($"memory plan (fp32, zero {zero}): ", text);
                Assert.Contains($"loaded the whole model from committed step 3 (saved as dp 2 x pp 2{(ep > 1 ? " x ep 2" : "")})", text);
                Assert.Contains($"model saved to the checkpoint store as exports/{spec.Name}/3/hf", text);
                Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), status.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
                Assert.Equal(one.ValidationLoss.Single(v => v.Step == Steps).Loss, status.ValidationLoss.Where(v => v.Step == Steps).Select(v => v.Loss).Distinct().Single());

                var tensors = await CommittedTensors.LoadWhole(Data, run.Store, spec.Name!, spec, Steps, run.Folder($"load-{spec.Name}"));
                CommittedTensors.AssertSame(oneTensors, tensors, $"the dp 2 x pp 2 x ep {ep} x zero {zero} job");
                output.WriteLine($"zero {zero} ep {ep}: {oneTensors.Count} tensors equal bit for bit; losses {string.Join(", ", status.Loss.Select(p => p.Loss))}");
            }
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }
}
