// The AppHost's --study: the file becomes a spec with a name and the prepared dataset, and the table says what ASHA did.
using DeepSeekCluster.AppHost;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Observability.Tests;

public class StudyRunTests
{
    [Fact]
    public void TheStudyFileGetsItsNameAndThePreparedDatasetAndTheTableShowsTheRungs()
    {
        var dir = Directory.CreateTempSubdirectory("study-file-").FullName;
        var file = Path.Combine(dir, "lr search.json");
        File.WriteAllText(file, """{"job": {"modelPreset": "tiny", "seqLen": 64}, "space": []}""");
        Assert.Equal(Path.GetFullPath(file), AppHostOptions.Parse(["--study", file], "/repo", []).StudyFile);
        var spec = StudyRun.ReadSpec(file, "ds-1");
        Assert.Equal(("lr-search", "ds-1"), (spec["name"]!.GetValue<string>(), spec["job"]!["dataset"]!.GetValue<string>()));
        Assert.Equal(64, StudyRun.SeqLenOf(file));
        File.WriteAllText(file, "[1, 2]");
        Assert.Contains("not a JSON object", Assert.Throws<InvalidOperationException>(() => StudyRun.ReadSpec(file, "ds-1")).Message);

        var table = StudyRun.Table(new StudyStatus
        {
            StudyId = "s", State = StudyState.Running,
            Trials = [new TrialStatus { JobId = "s-t001", State = TrialState.Pruned, Step = 10, Metric = 6.25, StoppedAtRung = 0, Parameters = new() { ["schedule.peakLr"] = "0.01" } }],
            Rungs = [new RungStatus(0, 10, 2, 5.5, 1)],
        });
        Assert.Contains("s-t001", table);
        Assert.Contains("6.2500  schedule.peakLr = 0.01  (stopped at rung 0)", table);
        Assert.Contains("rung 0 at step 10: 2 results, 1 stopped, cut-off 5.5000", table);
        Directory.Delete(dir, recursive: true);
    }
}
