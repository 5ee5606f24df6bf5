// A generation's step reports that reach the job grain before its rank 0's Resumed report (each rank reports on its own
// stream; after a Coordinator restart a rank flushes a whole queue on reconnect): the Resumed still counts only the
// steps the generation redoes, and the ledger keeps every step the generation trained, across a silo restart between.
using DeepSeekCluster.Contracts.Grains;
using K = DeepSeekCluster.Contracts.Grains.JobEventKinds;

namespace DeepSeekCluster.Coordinator.Tests;

public class ResumeReportOrderTests
{
    const int GlobalBatch = 8, Half = GlobalBatch / 2;

    static StepReport Slice(int rank, long step) => new() { Rank = rank, Step = step, Loss = 10 - step, SampleStart = (step - 1) * GlobalBatch + rank * Half, SampleCount = Half };

    [Fact]
    public async Task StepsReportedBeforeTheirGenerationsResumedAreNotCountedAsRedoneAndStayInTheLedger()
    {
        string folder = TestSpecs.TempFolder();
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            var job = c.Job("order");
            await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 6));
            await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
            long w2 = await c.Worker("w2").RegisterAsync(TestSpecs.Worker("w2"), null);
            await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
            await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
            for (long s = 1; s <= 3; s++)
                foreach (int rank in new[] { 0, 1 }) await job.ReportStepAsync(1, Slice(rank, s));

            // w2 is lost after step 3; generation 2 resumes from rank 0's live state of step 3: nothing is redone.
            await c.Worker("w2").DisconnectedAsync(w2, "killed", LeaveKind.Lost);
            await c.Worker("w3").RegisterAsync(TestSpecs.Worker("w3"), null);
            await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "re-formation");
            // Rank 1's reports of steps 4 and 5 arrive first; the silo restarts before rank 0's Resumed.
            await job.ReportStepAsync(2, Slice(1, 4));
            await job.ReportStepAsync(2, Slice(1, 5));
        }
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            var job = c.Job("order");
            await job.ReportResumedAsync(2, new ResumedReport { Step = 3, Source = "replica", SourceRank = 0 });
            await job.ReportStepAsync(2, Slice(0, 4));
            await job.ReportStepAsync(2, Slice(0, 5));
            var status = await job.GetStatusAsync();
            var resumed = status.Events.Last(e => e.Kind == K.Resumed);
            Assert.Equal((3L, 0L), (resumed.ResumeStep, resumed.StepsRedone));
            Assert.EndsWith("0 steps redone", resumed.Message);
            Assert.Equal(5, status.Step);
            // Every sample of steps 1..5 once: rank 1's early slices of steps 4 and 5 were not dropped with "redone" steps.
            Assert.Equal((5L * GlobalBatch, true, 0L), (status.Consumption.Samples, status.Consumption.Complete, status.Consumption.Overlaps));
            Assert.Equal([[0L, 5L * GlobalBatch]], status.Consumption.Ranges);
            Assert.Equal([9.0, 8, 7, 6, 5], status.Loss.Select(p => p.Loss));
        }
    }

    [Fact]
    public async Task RankZerosStepWithoutItsResumedReleasesTheHeldReports()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("lost-resumed");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 6));
        await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
        await c.Worker("w2").RegisterAsync(TestSpecs.Worker("w2"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        // Rank 0's Resumed died with a Coordinator: rank 1's step is held until rank 0's own step shows none is coming.
        await job.ReportStepAsync(1, Slice(1, 1));
        Assert.Equal(0, (await job.GetStatusAsync()).Step);
        await job.ReportStepAsync(1, Slice(0, 1));
        await job.ReportStepAsync(1, Slice(1, 2));
        await job.ReportStepAsync(1, Slice(0, 2));
        var status = await job.GetStatusAsync();
        Assert.Equal(2, status.Step);
        Assert.Equal([[0L, 2L * GlobalBatch]], status.Consumption.Ranges);
        Assert.DoesNotContain(status.Events, e => e.Kind == K.Resumed);
    }
}
