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

    [Theory]
    [InlineData("sigkill@7")]       // whose process?
    [InlineData("sigkill@7:")]
    [InlineData("nan@3:gpu-worker-1")] // the step guard's faults hit every rank alike
    [InlineData("sigkill@0:gpu-worker-1")]
    [InlineData("hang@4")]
    public void AMalformedFaultIsRefusedNamingTheSettingAndThePart(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => FaultInjection.Parse(text, "Worker__InjectFault"));
        Assert.Contains($"Worker__InjectFault: '{text}' is not a fault", e.Message);
        Assert.Contains("sigkill@STEP:WORKER", e.Message);
    }
}
