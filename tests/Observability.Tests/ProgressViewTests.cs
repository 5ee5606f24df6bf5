// The AppHost's progress view and endpoints file, as units: formatting, when output is live, the ETA, and what workers announce.
using System.Text.Json;
using DeepSeekCluster.AppHost;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Observability.Tests;

public class ProgressViewTests
{
    static Func<string, string?> Env(params (string Key, string Value)[] vars) => k => vars.FirstOrDefault(v => v.Key == k).Value;

    static readonly DevicePeakInfo Box = new(80e9, "fp32", "calibrated", "calibrated 2026-12-06 on AMD EPYC 7763 (2 cores)", "cpu:box");

    static JobProgress At(long step, string state = "Running", long generation = 1) =>
        new(state, generation, step, 40, 3.25, 12_345, Utilization.Of([new MemberUtilization(0, 1, step, 1e9, Box)]), 2, 20, TimeSpan.FromSeconds(75));

    [Fact]
    public void LiveOnlyOnATerminalWithoutNoColorOrADumbTerm()
    {
        Assert.True(ProgressView.IsLive(false, Env(("TERM", "xterm"))));
        Assert.False(ProgressView.IsLive(true, Env()));
        Assert.False(ProgressView.IsLive(false, Env(("NO_COLOR", "1"))));
        Assert.False(ProgressView.IsLive(false, Env(("TERM", "dumb"))));
    }

    [Fact]
    public void TheLineShowsStepOfTotalLossThroughputMfuWorkersCheckpointAndEta()
    {
        Assert.Equal("job running | generation 1 | step 10/40 (25%) | loss 3.2500 | 12.3k tok/s | MFU 1.25% of 80.0 GFLOP/s | workers 2 | checkpoint step 20 | ETA 01:15",
            ProgressView.Format(At(10)));
        Assert.Equal("job forming | generation 0 | step 0/40 (0%) | loss - | tok/s - | MFU - | workers 0 | no checkpoint yet | ETA -",
            ProgressView.Format(new JobProgress("Forming", 0, 0, 40, null, null, null, 0, null, null)));
    }

    /// <summary>The AppHost's line reads tokens/s as the standalone trainer's does: a small CPU job is "412 tok/s", not "0.4k".</summary>
    [Theory]
    [InlineData(412.4, "412 tok/s")]
    [InlineData(38.06, "38.1 tok/s")]
    [InlineData(2_140, "2.14k tok/s")]
    [InlineData(1_234_567, "1.23M tok/s")]
    public void TheThroughputReadsInThreeSignificantDigitsForASmallCpuJobAndALargeCluster(double tokensPerSecond, string shown) =>
        Assert.Contains($" | loss 3.2500 | {shown} | MFU ", ProgressView.Format(At(10) with { TokensPerSecond = tokensPerSecond }));

    [Fact]
    public void TheEtaIsThePaceSinceTheFirstStepSeenTimesTheStepsLeft()
    {
        // From step 5 to step 15 in 20 s: 2 s a step; 25 steps left.
        Assert.Equal(TimeSpan.FromSeconds(50), ProgressView.Eta(5, TimeSpan.FromSeconds(20), 15, 40));
        Assert.Null(ProgressView.Eta(5, TimeSpan.FromSeconds(3), 5, 40)); // no step since: no pace yet
        Assert.Equal("1:02:03", ProgressView.FormatEta(new TimeSpan(1, 2, 3)));
        Assert.Equal("02:03", ProgressView.FormatEta(new TimeSpan(0, 2, 3)));
    }

    [Fact]
    public void PlainOutputPrintsStateChangesEveryTenStepsAndTheLastStep()
    {
        Assert.True(ProgressView.PlainLineDue(At(0), null, 10));
        Assert.False(ProgressView.PlainLineDue(At(3), At(1), 10));
        Assert.True(ProgressView.PlainLineDue(At(11), At(9), 10)); // crossed 10 between polls
        Assert.True(ProgressView.PlainLineDue(At(3, "Rescaling"), At(3), 10));
        Assert.True(ProgressView.PlainLineDue(At(3, generation: 2), At(3), 10));
        Assert.True(ProgressView.PlainLineDue(At(40), At(39), 10));
        Assert.False(ProgressView.PlainLineDue(At(12), At(12), 10));
    }

    [Fact]
    public void TheMfuComesFromTheJobStatusAndACappedFigureSaysThePeakLooksTooLow()
    {
        // Through GET /jobs/{id}'s JSON, as the AppHost reads it: two workers on one machine, which together did more than its peak.
        var written = JsonSerializer.Serialize(new JobStatus
        {
            JobId = "j", Utilization = Utilization.Of([new MemberUtilization(0, 1, 7, 50e9, Box), new MemberUtilization(1, 1, 7, 40e9, Box)]),
        }, JobSpecJson.Options);

        var u = JsonSerializer.Deserialize<JobStatus>(written, JobSpecJson.Options)!.Utilization!;

        Assert.Equal((90e9, 80e9, 1.0, true), (u.AchievedFlops, u.PeakFlops, u.Mfu, u.PeakTooLow));
        Assert.Contains("| MFU 100.00% of 80.0 GFLOP/s (capped: the peak looks too low) |",
            ProgressView.Format(At(7) with { Mfu = u }));
        Assert.Equal("MFU is the members' model FLOP/s over 80.0 GFLOP/s, the sum of their devices' peaks: calibrated 2026-12-06 on AMD EPYC 7763 (2 cores) " +
                     "(warning: the members did 1.12× that: the peak looks too low, MFU is shown as at most 100%)", ProgressView.PeakLine(u));
        Assert.Null(JsonSerializer.Deserialize<JobStatus>(JsonSerializer.Serialize(new JobStatus { JobId = "j" }, JobSpecJson.Options), JobSpecJson.Options)!.Utilization);
    }

    [Fact]
    public void TheEndpointsFileListsInstancesAndTheWorkersTheCoordinatorKnows()
    {
        var path = Path.Combine(Directory.CreateTempSubdirectory("endpoints-").FullName, "endpoints.json");
        var file = new EndpointsFile(path);
        static System.Text.Json.Nodes.JsonArray Written(string path) => System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(path))!["instances"]!.AsArray();
        file.SetWorkers("gpu-worker", new Dictionary<string, string> { ["gpu-worker-0"] = "http://127.0.0.1:40123/", ["gpu-worker-1"] = "http://127.0.0.1:40124" });
        var written = Written(path);
        Assert.Equal(["gpu-worker-0", "gpu-worker-1"], written.Select(i => i!["instance"]!.GetValue<string>()));
        Assert.Equal("http://127.0.0.1:40123", written[0]!["endpoints"]!["http"]!.GetValue<string>());
        // A worker the Coordinator no longer lists online leaves the file; a new one joins it.
        file.SetWorkers("gpu-worker", new Dictionary<string, string> { ["gpu-worker-1"] = "http://127.0.0.1:40124", ["gpu-worker-2"] = "http://127.0.0.1:40125" });
        Assert.Equal(["gpu-worker-1", "gpu-worker-2"], Written(path).Select(i => i!["instance"]!.GetValue<string>()));
        file.Remove("gpu-worker-1");
        Assert.Single(Written(path));
        Directory.Delete(Path.GetDirectoryName(path)!, true);
    }
}
