// The train verb's command line: an unset warmup fits a short run, an explicit one is checked as typed.
namespace DeepSeekCluster.GpuWorker.Tests;

public class StandaloneTrainOptionsTests
{
    [Fact]
    public void AShortRunWithoutWarmupGetsATenthOfItsStepsAsWarmup()
    {
        var spec = StandaloneCommands.ParseTrain(["--steps", "20"]);
        Assert.Equal(20, spec.Options.Steps);
        Assert.Equal(2, spec.Options.WarmupSteps);
    }

    [Fact]
    public void TheDefaultRunKeepsThirtyWarmupSteps()
    {
        Assert.Equal(30, StandaloneCommands.ParseTrain([]).Options.WarmupSteps);
        Assert.Equal(30, StandaloneCommands.ParseTrain(["--steps", "5000"]).Options.WarmupSteps);
    }

    [Fact]
    public void AnExplicitWarmupIsKeptAsGiven()
    {
        Assert.Equal(0, StandaloneCommands.ParseTrain(["--steps", "20", "--warmup", "0"]).Options.WarmupSteps);
        Assert.Equal(15, StandaloneCommands.ParseTrain(["--steps", "20", "--warmup", "15"]).Options.WarmupSteps);
    }

    [Fact]
    public void AnExplicitWarmupLongerThanTheRunIsRefusedNamingBothValues()
    {
        var e = Assert.Throws<ArgumentException>(() => StandaloneCommands.ParseTrain(["--steps", "20", "--warmup", "30"]));
        Assert.Contains("warmup must be between 0 and steps (20), got 30", e.Message);
    }

    [Fact]
    public void TheUnsetWarmupFollowsStepsSetLater()
    {
        // A record copy with fewer steps keeps following them while the warmup was never set.
        var options = new DeepSeekCluster.Training.Engine.TrainingOptions { Steps = 600 } with { Steps = 40 };
        Assert.Equal(4, options.WarmupSteps);
        Assert.Empty(options.Problems());
    }
}
