// A dp 2 x pp 2 x ep 2 job (and the same with ZeRO-2: each rank also holds half its stage's optimizer state) that loses a
// rank: each rank holds one stage's half of the routed experts and nobody else does, so the lost rank's experts survive
// only in the committed checkpoint. The real Coordinator (in this process)
// re-forms the job on the spare worker, every rank loads that checkpoint (the stages agree on it, so no stage goes on
// live while another reloads), the steps since are trained again, and the final checkpoint equals, bit for bit, the one
// an uninterrupted one-worker job commits, with every sample in the ledger once.
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using Xunit.Abstractions;

namespace DeepSeekCluster.GpuWorker.Tests;

// In the cluster tests' collection: the bit-for-bit comparison needs the seeded weights no other test class disturbs.
[Collection(nameof(ExpertParallelClusterTests))]
public class ExpertPipelineResumeTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 4, GlobalBatch = 8;
    DataShardsHost Data => fixture.Host;

    // Unclipped and without MTP, as the dp 2 x pp 2 x ep 2 test of ExpertParallelClusterTests says why: a stage's norm
    // share and the MTP embedding gradient come along the pipeline and are added in another order than one process adds them.
    JobSpec Spec(string name, ParallelPlan parallel, int workers) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = GlobalBatch, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 17, EvalInterval = 0, CheckpointInterval = 1, Parallel = parallel, MinWorkers = workers, MaxWorkers = workers,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0, MtpWeight = 0,
    };

    [Theory]
    [InlineData(0)]
    [InlineData(2)]
    public async Task ADp2Pp2Ep2JobThatLosesARankResumesFromTheCheckpointOnTheSpareAndCommitsTheOneWorkerJobsCheckpoint(int zero)
    {
        await using var run = await ClusterRun.StartAsync(Data, "eppp-resume");
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < 5; i++) run.StartWorker($"eppp-resume-worker-{i}"); // four ranks and a spare

            var eppp = Spec($"eppp-resume-zero{zero}", new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Zero = zero }, 4);
            Assert.Empty(eppp.Validate());
            // Step 3's samples are held at the data service until the rank has been asked to leave: however slowly this
            // test polls on a loaded machine, the job cannot finish before the loss.
            Data.Calls.Hold = r => r.Split == "train" && r.Start >= 2 * GlobalBatch;
            string leaving;
            try
            {
                await ClusterJobs.Submit(http, eppp);
                // Once a step is committed, the worker of the last stage's second expert shard leaves (finishing its step in flight).
                JobStatus? before = null;
                await InProcessCoordinator.Until(async () =>
                {
                    before = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{eppp.Name}", JobSpecJson.Options))!;
                    Assert.NotEqual(JobState.Failed, before.State);
                    Assert.True(before.Step < Steps, "the job finished before a rank could leave it");
                    return before.Workers.Length == 4 && before.Committed.Length > 0;
                }, "the ep x pp job commits a step on four workers", log);
                leaving = before!.Workers.Single(w => w.Rank == 3).WorkerId;
                await run.StopWorker(leaving);
            }
            finally { Data.Calls.ReleaseAll(); }

            var resumed = await ClusterJobs.Completion(http, eppp.Name!, Steps, log);
            var last = resumed.Events.Last(e => e.Kind == JobEventKinds.Resumed);
            Assert.True(last.Generation > 1, "the job did not re-form after losing a rank");
            Assert.Equal("checkpoint", last.ResumeSource);
            Assert.Contains("from the committed checkpoint of step", last.Message);
            Assert.DoesNotContain(resumed.Workers, w => w.WorkerId == leaving);
            Assert.Equal(4, resumed.Workers.Length);

            var one = Spec($"eppp-resume-reference-{zero}", new ParallelPlan { Dp = 1 }, 1);
            await ClusterJobs.Submit(http, one);
            var reference = await ClusterJobs.Completion(http, one.Name!, Steps, log);

            foreach (var s in new[] { resumed, reference })
            {
                Assert.True(s.Consumption.Complete, $"{s.JobId}: the ledger is not complete: {s.Consumption}");
                Assert.Equal(((long)Steps * GlobalBatch, 0L), (s.Consumption.Samples, s.Consumption.Overlaps));
            }
            Assert.Equal(ClusterJobs.Losses(reference), ClusterJobs.Losses(resumed));
            var expected = await CommittedTensors.LoadWhole(Data, run.Store, one.Name!, one, Steps, run.Folder("load-one"));
            var actual = await CommittedTensors.LoadWhole(Data, run.Store, eppp.Name!, one, Steps, run.Folder("load-eppp"));
            Assert.Contains(expected.Keys, k => k.Contains(".mlp.experts.7.") && k.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
            CommittedTensors.AssertSame(expected, actual, "the resumed ep x pp job");
            output.WriteLine($"{expected.Count} tensors equal bit for bit; {last.Message}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }
}
