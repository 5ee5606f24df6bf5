// The Coordinator's jobs-by-state gauge and worker-event counter, read through a MeterListener from the silo of an
// in-process grain cluster while its job and worker grains go through their transitions.
using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.DependencyInjection;

namespace DeepSeekCluster.Coordinator.Tests;

public class CoordinatorMetricsTests
{
    /// <summary>Listens to one silo's Coordinator meter only (other test classes run clusters in this process too).</summary>
    sealed class SiloMeter : IDisposable
    {
        readonly MeterListener listener = new();
        readonly ConcurrentDictionary<string, long> jobs = new(), events = new();

        public SiloMeter(IServiceProvider silo)
        {
            var factory = silo.GetRequiredService<IMeterFactory>();
            silo.GetRequiredService<CoordinatorMetrics>(); // its instruments exist from here on, not from the first grain that needs them
            listener.InstrumentPublished = (instrument, l) =>
            {
                if (instrument.Meter.Name == CoordinatorMetrics.MeterName && ReferenceEquals(instrument.Meter.Scope, factory)
                    && instrument.Name is "deepseek.cluster.jobs" or "deepseek.cluster.worker_events")
                    l.EnableMeasurementEvents(instrument);
            };
            listener.SetMeasurementEventCallback<long>((instrument, value, tags, _) =>
            {
                string label = "";
                foreach (var t in tags) if (t.Key is "state" or "event") label = (string)t.Value!;
                if (instrument.Name == "deepseek.cluster.jobs") jobs[label] = value; // a gauge: the latest observation
                else events.AddOrUpdate(label, value, (_, sum) => sum + value);
            });
            listener.Start();
        }

        /// <summary>The gauge as a scrape would read it now: every state, zeros included.</summary>
        public Dictionary<string, long> Jobs()
        {
            jobs.Clear();
            listener.RecordObservableInstruments();
            return new Dictionary<string, long>(jobs);
        }

        public long Events(string e) => events.GetValueOrDefault(e);

        public void Dispose() => listener.Dispose();
    }

    static string Describe(Dictionary<string, long> d) => string.Join(", ", d.OrderBy(kv => kv.Key).Select(kv => $"{kv.Key}={kv.Value}"));

    [Fact]
    public async Task TheJobsGaugeCountsEachJobInItsCurrentState()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        using var meter = new SiloMeter(c.SiloServices);
        Assert.Equal(["completed", "failed", "forming", "pending", "rescaling", "running", "stopped"], meter.Jobs().Keys.Order());
        Assert.All(meter.Jobs().Values, v => Assert.Equal(0, v));

        // Two jobs that wait for two workers each; one of them is then stopped.
        await c.Job("a").SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 2));
        await c.Job("b").SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 2));
        Assert.Equal(2, meter.Jobs()["forming"]);
        await c.Job("b").StopAsync();
        var now = meter.Jobs();
        Assert.True(now["forming"] == 1 && now["stopped"] == 1 && now.Values.Sum() == 2, Describe(now));

        // Job a forms on two workers (running), loses one (rescaling), re-forms on a third and completes (its final checkpoint commits).
        await c.Worker("m1").RegisterAsync(TestSpecs.Worker("m1"), null);
        long m2 = await c.Worker("m2").RegisterAsync(TestSpecs.Worker("m2"), null);
        await TestSpecs.EventuallyAsync(c.Job("a").GetStatusAsync, s => s.State == JobState.Running, "formation");
        now = meter.Jobs();
        Assert.True(now["running"] == 1 && now["forming"] == 0 && now["stopped"] == 1, Describe(now));
        await c.Worker("m2").DisconnectedAsync(m2, "killed", LeaveKind.Lost);
        await TestSpecs.EventuallyAsync(c.Job("a").GetStatusAsync, s => s.State == JobState.Rescaling, "rescaling");
        now = meter.Jobs();
        Assert.True(now["rescaling"] == 1 && now["running"] == 0, Describe(now));
        await c.Worker("m3").RegisterAsync(TestSpecs.Worker("m3"), null);
        await TestSpecs.EventuallyAsync(c.Job("a").GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "re-formation");
        await c.Job("a").ReportStepAsync(2, new StepReport { Step = 1, Loss = 9 });
        await c.Job("a").ReportStepAsync(2, new StepReport { Step = 2, Loss = 8 });
        await c.Job("a").CheckpointCommittedAsync(new CommittedCheckpoint(2, 2, 2, 100));
        now = meter.Jobs();
        Assert.True(now["completed"] == 1 && now["stopped"] == 1 && now.Values.Sum() == 2, Describe(now));
    }

    [Fact]
    public async Task WorkerEventsCountJoinsCleanLeavesAndFailures()
    {
        // Long enough that the registrations below are not timed out before the test disconnects them, short enough to wait for.
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder(), heartbeatTimeout: TimeSpan.FromSeconds(5));
        using var meter = new SiloMeter(c.SiloServices);

        long j1 = await c.Worker("j1").RegisterAsync(TestSpecs.Worker("j1"), null);
        long j2 = await c.Worker("j2").RegisterAsync(TestSpecs.Worker("j2"), null);
        // A second registration of a worker that is still online (its stream came back) is not a new join.
        j2 = await c.Worker("j2").RegisterAsync(TestSpecs.Worker("j2"), null);
        Assert.Equal(2, meter.Events("joined"));

        await c.Worker("j1").DisconnectedAsync(j1, "SIGTERM", LeaveKind.Left);
        Assert.Equal(1, meter.Events("left"));
        await c.Worker("j2").DisconnectedAsync(j2, "stream reset", LeaveKind.Lost);
        Assert.Equal(1, meter.Events("failed"));

        // j1 comes back (a join again) and then falls silent: the heartbeat timeout is a failure, not a clean leave.
        await c.Worker("j1").RegisterAsync(TestSpecs.Worker("j1"), null);
        Assert.Equal(3, meter.Events("joined"));
        await TestSpecs.EventuallyAsync(() => Task.FromResult(meter.Events("failed")), n => n == 2, "the heartbeat timeout of j1", seconds: 60);
        Assert.False((await c.Worker("j1").GetAsync()).Online);
        Assert.Equal(1, meter.Events("left"));
    }
}
