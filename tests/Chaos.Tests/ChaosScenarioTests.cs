// Chaos scenarios against the real cluster: real processes, real signals, a real network cut. Each scenario runs a
// small job, injects one kind of fault, and checks that the job completes, the consumption ledger has neither repeats
// nor gaps, the expected events happened, the final model equals the undisturbed reference within tolerance, and no
// process of the scenario is left behind.
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;

namespace DeepSeekCluster.Chaos.Tests;

public sealed class ChaosScenarioTests : IClassFixture<ChaosFixture>
{
    readonly ChaosFixture fx;
    readonly ITestOutputHelper output;
    static readonly TimeSpan Generous = TimeSpan.FromMinutes(6);
    ChaosCluster Cluster => fx.Cluster;

    public ChaosScenarioTests(ChaosFixture fixture, ITestOutputHelper output)
    {
        fx = fixture;
        this.output = output;
        fx.Output = output;
    }

    /// <summary>
    /// Relative tolerance for the final weights against the reference: max |a-b| of each tensor ≤ this × the reference
    /// tensor's largest magnitude. A run resumed from a checkpoint or a replica holds the exact float32 state, so with the
    /// world size of the reference the result is bitwise equal; a different world size sums the gradient over replicas
    /// and micro-batches in another order, which changes the gradients by a few float32 ulps per step. Adam divides by
    /// √v, so such a change moves a weight by at most about lr·(relative gradient change) per step; over 40 steps at
    /// lr 3e-3 that stays far below 1e-3 of a weight's scale, while a wrong resume (a repeated or skipped batch, a lost
    /// optimizer state, a step from the wrong checkpoint) moves weights by lr-sized amounts, i.e. ≳ 1e-2 of the scale.
    /// </summary>
    const double Tolerance = 1e-3;

    sealed record Outcome(JobView Job, ModelDiff Model, List<string> Instances);

    async Task<Outcome> RunAsync(ChaosJob job, int workers, Func<string, List<string>, Task> fault, bool namespaced = false)
    {
        var instances = new List<string>();
        var started = DateTime.UtcNow;
        try
        {
            for (int i = 0; i < workers; i++) instances.Add(Cluster.AddWorker(inNamespace: namespaced && i == workers - 1));
            await Cluster.SubmitAsync(job, fx.DatasetId, CancellationToken.None);
            await fault(job.Name, instances);
            var (view, modelFile) = await Cluster.WaitForCompletionAsync(job.Name, Generous, CancellationToken.None);
            var diff = ModelWeights.Compare(fx.Reference, ModelWeights.Read(modelFile));
            output.WriteLine($"{view.Describe()}\nmodel against the reference: {diff}\nscenario took {(DateTime.UtcNow - started).TotalSeconds:F1} s");
            return new Outcome(view, diff, [.. instances.Concat(Cluster.StartedWorkers.Except(instances))]);
        }
        finally
        {
            await Cluster.StopWorkersAsync();
        }
    }

    /// <summary>The checks every scenario shares.</summary>
    void AssertCommon(Outcome o, ChaosJob job)
    {
        var j = o.Job;
        Assert.Equal("completed", j.State);
        Assert.Equal(job.Steps, j.Step);
        Assert.True(j.Consumption is not null, $"the job reports no consumption ledger ('consumption' in GET /jobs/{{id}}):\n{j.Describe()}");
        var c = j.Consumption!;
        Assert.True(c.Ranges.Count == 1 && c.Ranges[0] == (0, job.Samples),
            $"consumption ranges [{string.Join(", ", c.Ranges.Select(r => $"[{r.Start},{r.End})"))}]; expected one range [0,{job.Samples}) (no repeat, no gap)");
        Assert.Equal(job.Samples, c.Samples);
        Assert.True(c.Complete, "the ledger says it is not complete");
        Assert.Empty(o.Model.Mismatched);
        var beyond = o.Model.Beyond(Tolerance);
        Assert.True(beyond.Count == 0, $"{beyond.Count} tensors differ from the reference beyond {Tolerance:E0} of their scale: {o.Model}");
    }

    async Task AssertNoOrphansAsync(IEnumerable<string> instances)
    {
        var left = await ProcessScan.WaitUntilNoneAsync(() => ChaosCluster.Alive(instances), TimeSpan.FromSeconds(30));
        Assert.True(left.Count == 0, $"processes left behind: {ProcessScan.Describe(left)}");
    }

    /// <summary>Waits until the job runs generation ≥ 1 with <paramref name="world"/> workers and has committed a checkpoint and moved past it.</summary>
    Task<JobView> RunningPastACheckpointAsync(string jobId, int world) =>
        Cluster.WaitForAsync(jobId, j => j.State == "running" && j.Workers.Count == world && j.CommittedSteps.Count > 0 && j.Step > j.CommittedSteps[^1],
                             Generous, $"{jobId} running on {world} workers past a committed checkpoint", CancellationToken.None, TimeSpan.FromMilliseconds(50));

    static void AssertResumedFromReplica(JobView j, long afterGeneration)
    {
        var resumed = j.OfKind("resumed").Where(e => e.Generation > afterGeneration).ToList();
        Assert.True(resumed.Count > 0, $"no 'resumed' event after generation {afterGeneration}:\n{j.Describe()}");
        Assert.All(resumed, e =>
        {
            Assert.Equal("replica", e.ResumeSource);
            Assert.Equal(0, e.StepsRedone);
        });
    }

    [Fact]
    public async Task WorkerKilledMidStepIsDetectedAndTheSurvivorsResumeFromTheirReplica()
    {
        var job = fx.Job(1, 3);
        string victim = "";
        long generation = 0;
        var o = await RunAsync(job, 3, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 3);
            generation = before.Generation;
            victim = before.Workers.Single(w => w.Rank == 1).WorkerId;
            Cluster.Signal(victim, Signals.Kill);
            await Cluster.WaitForExitAsync(victim, TimeSpan.FromSeconds(10), CancellationToken.None);
        });
        AssertCommon(o, job);
        var lost = o.Job.OfKind("worker_lost").Where(e => e.WorkerId == victim).ToList();
        Assert.True(lost.Count == 1, $"expected one worker_lost event for {victim}:\n{o.Job.Describe()}");
        Assert.Contains(o.Job.Events, e => e.Kind == "formed" && e.Generation > generation);
        AssertResumedFromReplica(o.Job, generation);
        Assert.Contains(o.Job.Events, e => e.Kind == "recovered" && e.Generation > generation && e.RecoverySeconds > 0);
        await AssertNoOrphansAsync(o.Instances);
    }
}
