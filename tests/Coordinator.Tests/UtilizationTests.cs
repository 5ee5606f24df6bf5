// The job's MFU: summed achieved FLOP/s over the summed peaks of the current generation's devices, never above 1.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class UtilizationTests
{
    static DevicePeakInfo Gpu(string uuid, double teraflops = 989.4) =>
        new(teraflops * 1e12, "bf16", "declared", "declared: NVIDIA H100 80GB HBM3 bf16", $"cuda:GPU-{uuid}");

    static DevicePeakInfo Cpu(string host, double gigaflops, string description = "calibrated 2026-12-06 on AMD EPYC 7763 (2 cores)") =>
        new(gigaflops * 1e9, "fp32", "calibrated", description, $"cpu:{host}");

    [Fact]
    public void TheClusterFigureIsTheSumOfAchievedOverTheSumOfPeaksNotTheMeanOfPercentages()
    {
        // A fast big GPU and a slow small one: the mean of their MFUs (50% and 10%) would read 30%.
        var members = new[]
        {
            new MemberUtilization(0, 1, 5, 500e12, Gpu("a", 1000)),
            new MemberUtilization(1, 1, 5, 10e12, Gpu("b", 100)),
        };

        var u = Utilization.Of(members)!;

        Assert.Equal(510e12, u.AchievedFlops);
        Assert.Equal(1100e12, u.PeakFlops);
        Assert.Equal(510.0 / 1100, u.Mfu, 12);
        Assert.False(u.PeakTooLow);
        Assert.Equal(0.5, u.Members[0].Mfu, 12);
    }

    [Fact]
    public void WorkersSharingOneMachineCountItsPeakOnce()
    {
        var members = new[]
        {
            new MemberUtilization(0, 1, 5, 30e9, Cpu("box", 100)),
            new MemberUtilization(1, 1, 5, 30e9, Cpu("box", 100)),
        };

        var u = Utilization.Of(members)!;

        Assert.Equal(100e9, u.PeakFlops);
        Assert.Equal(0.6, u.Mfu, 12);
        Assert.Equal(["calibrated 2026-12-06 on AMD EPYC 7763 (2 cores)"], u.Peaks);
    }

    [Fact]
    public void TheClusterFigureIsNeverAboveOneAndSaysThePeakLooksTooLow()
    {
        var u = Utilization.Of([new MemberUtilization(0, 1, 5, 150e9, Cpu("busy", 100))])!;

        Assert.Equal(1.0, u.Mfu);
        Assert.True(u.PeakTooLow);
        Assert.Equal(1.0, u.Members[0].Mfu);
    }

    [Fact]
    public void NoPeakNoFigure()
    {
        Assert.Null(Utilization.Of([]));
        Assert.Null(Utilization.Of([new MemberUtilization(0, 1, 5, 1e9, Cpu("x", 0))]));
    }

    [Fact]
    public void TheBoardKeepsEachRanksLatestStepOfTheCurrentGeneration()
    {
        var board = new UtilizationBoard();
        board.Record(1, new StepReport { Rank = 0, Step = 3, AchievedFlops = 10e9, Peak = Cpu("a", 100) });
        board.Record(1, new StepReport { Rank = 1, Step = 3, AchievedFlops = 20e9, Peak = Cpu("b", 100) });
        board.Record(1, new StepReport { Rank = 0, Step = 2, AchievedFlops = 99e9, Peak = Cpu("a", 100) }); // late: older than step 3
        board.Record(1, new StepReport { Rank = 1, Step = 4, AchievedFlops = 40e9 }); // no peak: not a reading

        var u = board.Of(1)!;
        Assert.Equal(30e9, u.AchievedFlops);
        Assert.Equal(200e9, u.PeakFlops);
        Assert.Equal("calibrated 2026-12-06 on AMD EPYC 7763 (2 cores) ×2", Assert.Single(u.Peaks));

        // A re-formation: generation 2 has one member; the old generation's readings are gone.
        board.Record(2, new StepReport { Rank = 0, Step = 5, AchievedFlops = 50e9, Peak = Cpu("c", 100) });
        u = board.Of(2)!;
        Assert.Equal((50e9, 100e9), (u.AchievedFlops, u.PeakFlops));
        Assert.Null(board.Of(1));
    }

    [Fact]
    public async Task TheJobStatusShowsTheClusterMfuAndWhichPeaksItUsed()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("mfu");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 4));
        await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
        await c.Worker("w2").RegisterAsync(TestSpecs.Worker("w2"), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        Assert.Null(status.Utilization);

        await job.ReportStepAsync(status.Generation, new StepReport { Rank = 0, Step = 1, Loss = 5, AchievedFlops = 400e12, Peak = Gpu("a") });
        await job.ReportStepAsync(status.Generation, new StepReport { Rank = 1, Step = 1, Loss = 5, AchievedFlops = 300e12, Peak = Gpu("b") });

        var u = (await job.GetStatusAsync()).Utilization!;
        Assert.Equal(700e12 / (2 * 989.4e12), u.Mfu, 12);
        Assert.Equal(["declared: NVIDIA H100 80GB HBM3 bf16 ×2"], u.Peaks);
        Assert.Equal([0, 1], u.Members.Select(m => m.Rank));
    }
}
