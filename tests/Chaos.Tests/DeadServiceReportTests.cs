// What a harness gets to read when a service dies before it is ready: the resource model's error must carry the dead
// process's exit code in words and its last lines of each stream, because the test host's console reaches no report.
using DeepSeekCluster.AppHost.Hosting;

namespace DeepSeekCluster.Chaos.Tests;

public sealed class DeadServiceReportTests
{
    [Fact]
    public async Task AServiceThatAbortsBeforeItIsReadyIsReportedWithItsExitCodeAndItsLastLinesFromBothStreams()
    {
        var builder = new DistributedApplicationBuilder(Path.GetTempPath(), "Debug");
        // Like a .NET service whose start throws: a line on stdout, the exception's text on stderr, then SIGABRT (134).
        var dying = builder.AddExecutable("dying-service", "sh", "-c",
            "for i in $(seq 1 80); do echo \"starting step $i\"; done; echo 'Unhandled exception. System.IO.InvalidDataException: torn' >&2; kill -ABRT $$");
        dying.ReadinessPort = FreePort.Next(); // nothing ever listens there: it can only become ready by failing
        await using var app = builder.Build();

        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => app.StartAsync(CancellationToken.None));

        Assert.Contains("exited with code 134 (SIGABRT", e.Message);
        Assert.Contains("its last 1 lines on stderr:\n  [dying-service] Unhandled exception. System.IO.InvalidDataException: torn", e.Message);
        Assert.Contains("on stdout:\n", e.Message);
        Assert.Contains("\n  [dying-service] starting step 80", e.Message);
        // The last lines, not all of them: a report stays readable however much the process wrote before it died.
        Assert.DoesNotContain("starting step 20\n", e.Message);
        Assert.Equal(DistributedApplication.QuotedLines, e.Message.Split('\n').Count(l => l.StartsWith("  [dying-service] starting step ", StringComparison.Ordinal)));
    }
}
