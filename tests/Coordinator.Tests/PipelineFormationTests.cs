// Pipeline-parallel jobs on the grains: stage-major ranks, stage links in the assignment, a ledger that counts each
// replica's slice once, and a checkpoint that needs every stage's files.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class PipelineFormationTests
{
    static JobSpec TwoByTwo(int steps = 2) => TestSpecs.Tiny(minWorkers: 4, maxWorkers: 4, steps: steps) with { Parallel = new ParallelPlan { Dp = 0, Pp = 2 } };

    static WorkerCapabilities Worker(string id, int port) =>
        TestSpecs.Worker(id) with { CollectiveEndpoint = $"127.0.0.1:{port}", PipelineEndpoint = $"127.0.0.1:{port + 1}" };

    [Fact]
    public void AJobWithPipelineStagesIsAcceptedAndItsWorldMustBeAMultipleOfPp()
    {
        Assert.Empty(TwoByTwo().Validate());
        // Three workers cannot hold two stages of whole replicas: refused, naming pp.
        var odd = TestSpecs.Tiny(minWorkers: 3, maxWorkers: 3) with { Parallel = new ParallelPlan { Pp = 2 } };
        var problem = Assert.Single(odd.Validate());
        Assert.Equal("parallel", problem.Field);
        Assert.Contains("a world is dp x pp (2) workers, between minWorkers and maxWorkers (3..3)", problem.Message);
    }

    [Fact]
    public async Task RanksAreStageMajorAndEachRankKnowsItsStagePeersAndItsReplicasSlice()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("pp-form");
        await job.SubmitAsync(TwoByTwo());
        string[] ids = ["p0", "p1", "p2", "p3"];
        for (int i = 0; i < ids.Length; i++) await c.Worker(ids[i]).RegisterAsync(Worker(ids[i], 41200 + 10 * i), null);
        string Pipeline(string id) => $"127.0.0.1:{41200 + 10 * Array.IndexOf(ids, id) + 1}";
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation of dp 2 x pp 2");
        Assert.Equal(4, status.Workers.Length);

        var assignments = new List<Assignment>();
        foreach (var w in status.Workers) assignments.Add((await c.Worker(w.WorkerId).GetAsync()).Assignment!);
        foreach (var a in assignments.OrderBy(a => a.Rank))
        {
            // rank = stage·dp + replica: ParallelLayout's file rank.
            Assert.Equal((a.Rank / 2, a.Rank % 2), (a.PpStage, a.DpRank));
            Assert.Equal((4, 2, 2), (a.World, a.DpSize, a.PpSize));
            // Every peer's pipeline listener travels with the assignment: stage s dials stage s+1 of its replica there.
            Assert.Equal(status.Workers.OrderBy(w => w.Rank).Select(w => (w.Rank, Pipeline(w.WorkerId))), a.Peers.Select(p => (p.Rank, p.PipelineEndpoint)));
        }
    }

    [Fact]
    public async Task StageZeroReportsTheSlicesAndTheLedgerCountsEachOnceWhileTheCheckpointWaitsForEveryStage()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("pp-ledger");
        await job.SubmitAsync(TwoByTwo(steps: 2));
        for (int i = 0; i < 4; i++) await c.Worker($"q{i}").RegisterAsync(Worker($"q{i}", 41300 + 10 * i), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        long g = status.Generation;

        // What the workers send: every rank reports the step's loss; only stage 0 (ranks 0 and 1) reports its replica's
        // slice, since stage 1 trains on the same samples.
        for (long step = 1; step <= 2; step++)
            for (int rank = 0; rank < 4; rank++)
            {
                int stage = rank / 2, replica = rank % 2;
                await job.ReportStepAsync(g, new StepReport
                {
                    Rank = rank, Step = step, Loss = 10 - step,
                    SampleStart = stage == 0 ? (step - 1) * 8 + replica * 4 : 0, SampleCount = stage == 0 ? 4 : 0,
                });
            }
        status = await job.GetStatusAsync();
        Assert.Equal((true, 16L, 0L), (status.Consumption.Complete, status.Consumption.Samples, status.Consumption.Overlaps));
        Assert.Equal([9.0, 8.0], status.Loss.Select(p => p.Loss));

        // The final checkpoint: complete only when all dp·pp = 4 rank files are reported.
        for (int rank = 0; rank < 3; rank++)
            Assert.False(await job.ReportCheckpointAsync(g, new CheckpointReport { Rank = rank, Step = 2, File = $"rank-{rank}.safetensors", SizeBytes = 1, Sha256 = "00" }));
        Assert.True(await job.ReportCheckpointAsync(g, new CheckpointReport { Rank = 3, Step = 2, File = "rank-3.safetensors", SizeBytes = 1, Sha256 = "00" }));
        // The grain hands the complete step to the committer itself: every rank's file, once.
        var (jobId, record) = Assert.Single(c.Handed.Commits);
        Assert.Equal((job.GetPrimaryKeyString(), 2L, g), (jobId, record.Step, record.Generation));
        Assert.Equal(["rank-0.safetensors", "rank-1.safetensors", "rank-2.safetensors", "rank-3.safetensors"], record.Files.Select(f => f.File));
    }
}
