// The values behind the panels that were empty before these metrics were emitted, read from the real Prometheus and checked
// against what the run itself reported elsewhere (the job's events and committed checkpoints, the worker's own log).
using System.Globalization;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Xunit.Abstractions;

namespace DeepSeekCluster.Observability.Tests;

[Collection(ClusterCollection.Name)]
public partial class RunMetricsTests(RunningCluster cluster, ITestOutputHelper log)
{
    /// <summary>Each series of an instant query at the end of the run: its labels and value.</summary>
    async Task<List<(JsonObject Labels, double Value)>> QueryAsync(string expr)
    {
        var result = await cluster.Prometheus.QueryAsync(expr, DateTimeOffset.UtcNow);
        Assert.True(result.Error is null, $"{expr}: {result.Error}");
        var series = result.Series.Select(s => (s!["metric"]!.AsObject(), double.Parse(s["value"]![1]!.GetValue<string>(), CultureInfo.InvariantCulture))).ToList();
        log.WriteLine($"{expr} = {string.Join("; ", series.Select(s => $"{s.Item1.ToJsonString()} {s.Item2}"))}");
        return series;
    }

    [Fact]
    public async Task TheCheckpointLoadIsTheCommittedCheckpointTheLastGenerationResumedFrom()
    {
        var job = (await cluster.JobAsync())!;
        var resumed = job["events"]!.AsArray().Last(e => e!["resumeSource"]?.GetValue<string>() == "checkpoint")!;
        long step = resumed["resumeStep"]!.GetValue<long>();
        var committed = job["committed"]!.AsArray().Single(c => c!["step"]!.GetValue<long>() == step)!;

        // The worker scraped now is the one that joined last and loaded: one load, of every file of that checkpoint.
        var loads = await QueryAsync($"deepseek_checkpoint_load_seconds_count{{training_job=\"{cluster.JobId}\"}}");
        var load = Assert.Single(loads);
        Assert.Equal(1, load.Value);
        string worker = load.Labels["worker"]!.GetValue<string>();
        var bytes = Assert.Single(await QueryAsync($"deepseek_checkpoint_bytes_total{{training_job=\"{cluster.JobId}\", direction=\"load\"}}"));
        Assert.Equal(committed["bytes"]!.GetValue<long>(), (long)bytes.Value);
        var seconds = Assert.Single(await QueryAsync($"deepseek_checkpoint_load_seconds_sum{{worker=\"{worker}\"}}"));
        Assert.True(seconds.Value > 0, $"a load of {bytes.Value} bytes took {seconds.Value} s");

        // It saved from its resume to the end: every save recorded a snapshot, a save time and its shard's bytes.
        double saves = Assert.Single(await QueryAsync($"deepseek_checkpoint_save_seconds_count{{worker=\"{worker}\"}}")).Value;
        double snapshots = Assert.Single(await QueryAsync($"deepseek_checkpoint_snapshot_seconds_count{{worker=\"{worker}\"}}")).Value;
        double saved = Assert.Single(await QueryAsync($"deepseek_checkpoint_bytes_total{{worker=\"{worker}\", direction=\"save\"}}")).Value;
        Assert.True(saves >= 2, $"{worker} saved {saves} times after resuming at step {step} of {RunningCluster.Steps}");
        Assert.Equal(snapshots, saves);
        // Alone in its generation, it wrote one file per save, of the same size each time: the final checkpoint's one file.
        var final = job["committed"]!.AsArray().Single(c => c!["step"]!.GetValue<long>() == RunningCluster.Steps)!;
        Assert.Equal(1, final["files"]!.GetValue<int>());
        Assert.Equal(saves * final["bytes"]!.GetValue<long>(), saved);
    }

    [Fact]
    public async Task TheValidationLossIsTheOneTheWorkerLoggedAndTheDeviceStateHoldsTheResumedTensors()
    {
        var logged = ValidationLine().Matches(cluster.Output).Select(m => double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).ToList();
        Assert.True(logged.Distinct().Count() == 1, $"expected the run's one evaluation in the log, found {string.Join(", ", logged)}");
        var gauge = Assert.Single(await QueryAsync($"deepseek_train_validation_loss{{training_job=\"{cluster.JobId}\"}}"));
        Assert.Equal(logged[0], gauge.Value, 4); // the log prints 4 decimals

        // The state a checkpoint holds (the resumed event's bytes), plus one gradient per trainable weight: at most twice as much.
        var job = (await cluster.JobAsync())!;
        long stateBytes = job["events"]!.AsArray().Last(e => e!["resumeSource"]?.GetValue<string>() == "checkpoint")!["stateBytes"]!.GetValue<long>();
        var memory = Assert.Single(await QueryAsync($"deepseek_train_device_memory_bytes{{training_job=\"{cluster.JobId}\"}}"));
        Assert.InRange(memory.Value, stateBytes + 1, 2.0 * stateBytes);
    }

    [Fact]
    public async Task TheCoordinatorCountsTheJobsStateAndTheWorkersThatCameAndWent()
    {
        var jobs = (await QueryAsync("sum by (state) (deepseek_cluster_jobs)")).ToDictionary(s => s.Labels["state"]!.GetValue<string>(), s => s.Value);
        Assert.Equal(["completed", "failed", "forming", "pending", "rescaling", "running", "stopped"], jobs.Keys.Order());
        Assert.Equal(1, jobs["completed"]);
        Assert.Equal(1, jobs["stopped"]); // the trial of the study the cluster created and stopped (RunningCluster.StudyAsync)
        Assert.Equal(2, jobs.Values.Sum());

        // Three worker processes joined and two were stopped (SIGTERM: a clean leave, unless the stream broke first); whatever
        // reconnects happened, every join but the online worker's is matched by a departure.
        var events = (await QueryAsync("sum by (event) (deepseek_cluster_worker_events_total)")).ToDictionary(s => s.Labels["event"]!.GetValue<string>(), s => s.Value);
        var workers = JsonNode.Parse(await cluster.Coordinator.GetStringAsync("/workers"))!.AsArray();
        int online = workers.Count(w => w!["online"]!.GetValue<bool>());
        Assert.Equal(1, online);
        Assert.True(events["joined"] >= 3 && events["left"] >= 1, $"joined {events["joined"]}, left {events["left"]}, failed {events["failed"]}");
        Assert.Equal(online, events["joined"] - events["left"] - events["failed"]);
    }

    [Fact]
    public async Task TheJobsMfuIsItsMembersSummedFlopsOverTheirSummedPeaksAndNoOutputShowsMoreThanAHundredPercent()
    {
        // The job status: the last generation's member, its achieved FLOP/s against its CPU's cached calibration.
        var u = (await cluster.JobAsync())!["utilization"]!.AsObject();
        var members = u["members"]!.AsArray();
        Assert.NotEmpty(members);
        double achieved = members.Sum(m => m!["achievedFlops"]!.GetValue<double>());
        Assert.Equal(achieved, u["achievedFlops"]!.GetValue<double>(), 1e-9 * achieved);
        Assert.All(members, m => Assert.Equal("calibrated", m!["peak"]!["source"]!.GetValue<string>()));
        Assert.All(members, m => Assert.StartsWith("calibrated ", m!["peak"]!["description"]!.GetValue<string>()));
        double peak = u["peakFlops"]!.GetValue<double>(), mfu = u["mfu"]!.GetValue<double>();
        Assert.Equal(Math.Min(achieved / peak, 1), mfu, 12);
        Assert.InRange(mfu, double.Epsilon, 1);
        Assert.Equal(achieved > peak, u["peakTooLow"]!.GetValue<bool>());

        // /metrics: the peak and its source, and the dashboard's job figure from the same two series.
        var peaks = await QueryAsync($"deepseek_train_peak_flops_per_second{{training_job=\"{cluster.JobId}\"}}");
        Assert.NotEmpty(peaks);
        Assert.All(peaks, p => Assert.Equal("calibrated", p.Labels["source"]!.GetValue<string>()));
        var figure = Assert.Single(await QueryAsync(
            $"clamp_max(sum by (training_job) (deepseek_train_achieved_flops_per_second{{training_job=\"{cluster.JobId}\"}}) / " +
            $"sum by (training_job) (max by (training_job, hardware) (deepseek_train_peak_flops_per_second{{training_job=\"{cluster.JobId}\"}})), 1)"));
        Assert.InRange(figure.Value, double.Epsilon, 1);

        // Every MFU the AppHost and the workers printed (status lines, rank 0's step lines) is at most 100%, and the
        // AppHost said which peak it is against.
        var printed = MfuPrinted().Matches(cluster.Output).Select(m => double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)).ToList();
        Assert.NotEmpty(printed);
        Assert.All(printed, v => Assert.InRange(v, 0, 100));
        Assert.Contains("MFU is the members' model FLOP/s over ", cluster.Output);
    }

    [GeneratedRegex(@"MFU (\d+(?:\.\d+)?)%")] private static partial Regex MfuPrinted();

    [GeneratedRegex(@"validation loss (\d+\.\d+) nats/token")] private static partial Regex ValidationLine();
}
