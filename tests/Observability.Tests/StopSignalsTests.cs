// The signals that stop the AppHost's run (StopSignals): SIGTERM cancels the run instead of ending the process, and an
// inherited SIGINT ignore (a background command of a script) is recognised from the kernel's own /proc text.
using System.Diagnostics;
using DeepSeekCluster.AppHost;

namespace DeepSeekCluster.Observability.Tests;

public class StopSignalsTests
{
    /// <summary>
    /// Sends a real SIGTERM to this test process: with the registration it cancels the run's token and the process lives
    /// on; without it the runtime would end the process (the run then fails as a crashed test host).
    /// </summary>
    [Fact]
    public async Task SigtermCancelsTheRunInsteadOfEndingTheProcess()
    {
        using var stop = new CancellationTokenSource();
        using (StopSignals.CancelOnSignal(stop))
        {
            using (var kill = Process.Start("kill", ["-TERM", Environment.ProcessId.ToString()])) await kill.WaitForExitAsync();
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            while (!stop.IsCancellationRequested && DateTime.UtcNow < deadline) await Task.Delay(20);
        }
        Assert.True(stop.IsCancellationRequested, "SIGTERM did not cancel the run within 30 s");
    }

    [Theory]
    [InlineData("--ignore-signal=INT", true)]
    [InlineData("--default-signal=INT", false)]
    public void AnInheritedSigintIgnoreIsReadFromTheProcessStatus(string disposition, bool ignored)
    {
        // env sets the disposition and then execs cat, which keeps it: the status a started AppHost would read of itself.
        var psi = new ProcessStartInfo("env", [disposition, "cat", "/proc/self/status"]) { RedirectStandardOutput = true };
        using var p = Process.Start(psi)!;
        var status = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        Assert.Equal(ignored, StopSignals.SigintIgnored(status));
    }

    [Fact]
    public void AStatusTextWithoutASigIgnLineIsRefusedByName()
    {
        var e = Assert.Throws<FormatException>(() => StopSignals.SigintIgnored("Name:\tcat\nPid:\t1\n"));
        Assert.Contains("'SigIgn:'", e.Message);
    }
}
