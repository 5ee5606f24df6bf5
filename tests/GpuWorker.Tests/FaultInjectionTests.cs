// Worker__InjectFault's grammar: what each fault means, and the refusal of a malformed one naming the setting and the part.
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests;

public class FaultInjectionTests
{
    [Fact]
    public void ASigkillNamesItsStepAndWorkerBesideTheStepGuardsFaults()
    {
        var faults = FaultInjection.Parse("nan@3, sigkill@7:gpu-worker-1,spike@9", "Worker__InjectFault");
        Assert.Equal(new Dictionary<long, string> { [3] = "nan", [9] = "spike" }, faults.Faults);
        Assert.Equal(new Dictionary<long, string> { [7] = "gpu-worker-1" }, faults.Kills);
        Assert.Empty(FaultInjection.Parse(" ", "Worker__InjectFault").Kills);
    }

    [Fact]
    public void ASigkillNamingARankOfAGenerationKillsTheWorkerHoldingItThenAndNoOtherRankOrGeneration()
    {
        var faults = FaultInjection.Parse("sigkill@7:rank 2 of generation 1", "Worker__InjectFault");
        Assert.Equal(new Dictionary<long, string> { [7] = "rank 2 of generation 1" }, faults.Kills);
        Assert.True(faults.KillsBefore(7, "gpu-worker-0", generation: 1, rank: 2));
        Assert.False(faults.KillsBefore(7, "gpu-worker-0", generation: 2, rank: 2)); // the next generation's rank 2 runs step 7 again
        Assert.False(faults.KillsBefore(7, "gpu-worker-0", generation: 1, rank: 3));
        Assert.False(faults.KillsBefore(6, "gpu-worker-0", generation: 1, rank: 2));
        var byWorker = FaultInjection.Parse("sigkill@7:gpu-worker-1", "Worker__InjectFault");
        Assert.True(byWorker.KillsBefore(7, "gpu-worker-1", generation: 3, rank: 0));
        Assert.False(byWorker.KillsBefore(7, "gpu-worker-2", generation: 1, rank: 1));
    }

    [Theory]
    [InlineData("sigkill@7:rank two of generation 1")]
    [InlineData("sigkill@7:rank 2 of generation 0")]
    [InlineData("sigkill@7:rank 2")]
    [InlineData("updateloss@7:rank 2 of generation 1")] // an update loss names a worker
    public void AKillOfARankThatNamesNoRankOfAGenerationIsRefusedRatherThanNeverMatching(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => FaultInjection.Parse(text, "Worker__InjectFault"));
        Assert.Contains($"Worker__InjectFault: '{text}' names no worker: expected sigkill@STEP:rank R of generation G", e.Message);
    }

    [Fact]
    public void AnUpdateLossNamesItsStepAndWorkerAndIsThrownOnceAsALostLinkOnThatWorkerAlone()
    {
        var faults = FaultInjection.Parse("updateloss@4:gpu-worker-2,nan@3", "Worker__InjectFault");
        Assert.Equal(new Dictionary<long, string> { [4] = "gpu-worker-2" }, faults.UpdateLosses);
        Assert.Equal(new Dictionary<long, string> { [3] = "nan" }, faults.Faults);
        Assert.Empty(faults.Kills);
        var log = new List<string>();
        faults.AtUpdate(4, "gpu-worker-1", log.Add); // another worker
        faults.AtUpdate(3, "gpu-worker-2", log.Add); // another step
        Assert.Empty(log);
        var e = Assert.Throws<DeepSeekCluster.Training.Collectives.CollectiveException>(() => faults.AtUpdate(4, "gpu-worker-2", log.Add));
        Assert.Equal(DeepSeekCluster.Training.Collectives.CollectiveFailure.PeerLost, e.Failure);
        faults.AtUpdate(4, "gpu-worker-2", log.Add); // the redone step runs clean
        Assert.Equal(["injected fault: worker gpu-worker-2 loses its ring as step 4's update begins"], log);
    }

    [Theory]
    [InlineData("sigkill@7")]       // whose process?
    [InlineData("updateloss@7")]
    [InlineData("sigkill@7:")]
    [InlineData("nan@3:gpu-worker-1")] // the step guard's faults hit every rank alike
    [InlineData("sigkill@0:gpu-worker-1")]
    [InlineData("hang@4")]
    public void AMalformedFaultIsRefusedNamingTheSettingAndThePart(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => FaultInjection.Parse(text, "Worker__InjectFault"));
        Assert.Contains($"Worker__InjectFault: '{text}' is not a fault", e.Message);
        Assert.Contains("sigkill@STEP:WORKER or updateloss@STEP:WORKER", e.Message);
    }
}
