using DeepSeekCluster.Training.Optim;

namespace DeepSeekCluster.Training.Tests.Optim;

public class LrScheduleTests
{
    private const double Peak = 3e-4;
    private const double Tol = 1e-15;

    [Fact]
    public void CosineWarmsUpLinearlyThenFollowsTheHalfCosineToTheMinimum()
    {
        var lr = new LrSchedule.WarmupCosine(Peak, WarmupSteps: 100, TotalSteps: 1100, MinLrRatio: 0.1);
        double min = 0.1 * Peak;

        Assert.Equal(Peak / 100, lr.At(0), Tol);
        Assert.Equal(Peak * 50 / 100, lr.At(49), Tol);
        Assert.Equal(Peak, lr.At(99), Tol);                 // warmup end
        Assert.Equal(Peak, lr.At(100), Tol);                // cosine start
        Assert.Equal((Peak + min) / 2, lr.At(600), Tol);    // cosine midpoint
        Assert.Equal(min + (Peak - min) * (1 + Math.Cos(Math.PI / 4)) / 2, lr.At(350), Tol);
        Assert.Equal(min, lr.At(1100), Tol);                // end
        Assert.Equal(min, lr.At(100_000), Tol);             // flat after
    }

    [Fact]
    public void CosineNeverRisesAfterWarmup()
    {
        var lr = new LrSchedule.WarmupCosine(Peak, 10, 200, 0.0);

        for (long s = 10; s < 250; s++)
            Assert.True(lr.At(s + 1) <= lr.At(s), $"rose at step {s}");
    }

    [Fact]
    public void WsdIsFlatAtThePeakThenDecaysLinearlyOverTheLastFraction()
    {
        var lr = new LrSchedule.WarmupStableDecay(1.0, WarmupSteps: 10, TotalSteps: 100, DecayFraction: 0.2, MinLrRatio: 0.1);

        Assert.Equal(80, lr.DecayStart);
        Assert.Equal(0.1, lr.At(0), Tol);
        Assert.Equal(1.0, lr.At(9), Tol);
        Assert.Equal(1.0, lr.At(50), Tol);
        Assert.Equal(1.0, lr.At(80), Tol);
        Assert.Equal(0.55, lr.At(90), 1e-12);               // halfway down the decay
        Assert.Equal(0.1, lr.At(100), Tol);
        Assert.Equal(0.1, lr.At(1000), Tol);
    }

    [Fact]
    public void ConstantHoldsThePeakAfterItsWarmup()
    {
        Assert.Equal(Peak, new LrSchedule.Constant(Peak).At(0));
        var warm = new LrSchedule.Constant(Peak, WarmupSteps: 4);
        Assert.Equal(Peak / 4, warm.At(0), Tol);
        Assert.Equal(Peak, warm.At(3), Tol);
        Assert.Equal(Peak, warm.At(1_000_000), Tol);
    }

    [Fact]
    public void ParseKnowsEachScheduleByName()
    {
        Assert.Equal(new LrSchedule.WarmupCosine(Peak, 10, 100, 0.1), LrSchedule.Parse("cosine", Peak, 10, 100));
        Assert.Equal(new LrSchedule.WarmupStableDecay(Peak, 10, 100, 0.3, 0.05),
            LrSchedule.Parse(" WSD ", Peak, 10, 100, minLrRatio: 0.05, decayFraction: 0.3));
        Assert.Equal(new LrSchedule.Constant(Peak, 10), LrSchedule.Parse("Constant", Peak, 10, 100));
    }

    [Fact]
    public void AnUnknownScheduleNameListsTheKnownOnes()
    {
        var e = Assert.Throws<ArgumentException>(() => LrSchedule.Parse("linear", Peak, 10, 100));
        Assert.Contains("cosine, wsd, constant", e.Message);
    }

    [Fact]
    public void InconsistentSettingsAreRefused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new LrSchedule.WarmupCosine(Peak, 100, 50));
        Assert.Throws<ArgumentOutOfRangeException>(() => new LrSchedule.WarmupCosine(0, 10, 50));
        Assert.Throws<ArgumentOutOfRangeException>(() => new LrSchedule.WarmupCosine(Peak, 10, 50, MinLrRatio: 1.5));
        // A decay over the last 95 of 100 steps would start inside a 10-step warmup.
        Assert.Throws<ArgumentOutOfRangeException>(() => new LrSchedule.WarmupStableDecay(Peak, 10, 100, DecayFraction: 0.95));
    }
}
