// Chaos scenarios against the real cluster: real processes, real signals, a real network cut. Each scenario runs a
// small job, injects one kind of fault, and checks that the job completes, the consumption ledger has neither repeats
// nor gaps, the expected events happened, the final model equals the undisturbed reference bit for bit, and no
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

    sealed record Outcome(JobView Job, ModelDiff Model, List<string> Instances);

    async Task<Outcome> RunAsync(ChaosJob job, int workers, Func<string, List<string>, Task> fault, bool namespaced = false)
    {
        var instances = new List<string>();
        var started = DateTime.UtcNow;
        // The cluster is shared: a scenario that failed may have left a service dead; that must not fail this one too.
        await Cluster.EnsureServicesRunningAsync(CancellationToken.None);
        try
        {
            for (int i = 0; i < workers; i++) instances.Add(Cluster.AddWorker(inNamespace: namespaced && i == workers - 1));
            // The job forms with all of them at once; growing into them is the scale-out scenario's subject, not every one's.
            await Cluster.WaitForIdleWorkersAsync(instances, Generous, CancellationToken.None);
            await Cluster.SubmitAsync(job, fx.DatasetId, CancellationToken.None);
            await fault(job.Name, instances);
            var (view, modelFile) = await Cluster.WaitForCompletionAsync(job.Name, Generous, CancellationToken.None);
            var diff = ModelWeights.Compare(fx.Reference, ModelWeights.Read(modelFile));
            output.WriteLine($"{view.Describe()}\nmodel against the reference: {diff}\nscenario took {(DateTime.UtcNow - started).TotalSeconds:F1} s");
            return new Outcome(view, diff, [.. instances.Concat(Cluster.StartedWorkers.Except(instances))]);
        }
        catch
        {
            // The test host's console is nobody's: a dead service's last words reach the report only through the output.
            output.WriteLine(await Cluster.DescribeFailureAsync());
            throw;
        }
        finally
        {
            // A job that did not complete must not live on and claim the next scenario's workers.
            try { await Cluster.StopJobAsync(job.Name, CancellationToken.None); } catch (HttpRequestException) { }
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
        Assert.True(c.Complete, $"the ledger says it is not complete: {c.Samples} samples, {c.Overlaps} overlapping, ranges [{string.Join(", ", c.Ranges.Select(r => $"[{r.Start},{r.End})"))}]");
        Assert.Equal(0, c.Overlaps);
        // Training is bitwise identical at any world size (exact gradient, loss and load sums: ExactGradientSum), and a
        // resume restores the exact state, so whatever world sizes and restarts a scenario went through, the final model
        // is the undisturbed reference's to the last bit. A wrong resume (a repeated or skipped batch, a lost optimizer
        // state, a step from the wrong checkpoint) cannot pass this.
        Assert.Empty(o.Model.Mismatched);
        Assert.True(o.Model.Bitwise, $"the final model differs from the undisturbed reference's: {o.Model}");
    }

    async Task AssertNoOrphansAsync(IEnumerable<string> instances)
    {
        var left = await ProcessScan.WaitUntilNoneAsync(() => Cluster.Alive(instances), TimeSpan.FromSeconds(30));
        Assert.True(left.Count == 0, $"processes left behind: {ProcessScan.Describe(left)}");
    }

    static JobEventView Single(JobView j, string kind, string workerId, DateTimeOffset? after = null)
    {
        var found = j.OfKind(kind).Where(e => e.WorkerId == workerId && (after is null || e.At >= after)).ToList();
        Assert.True(found.Count >= 1, $"no '{kind}' event for {workerId}{(after is null ? "" : $" after {after:HH:mm:ss.fff}")}:\n{j.Describe()}");
        return found[0];
    }

    Task<JobView> EventAsync(string jobId, string kind, string workerId, string what) =>
        Cluster.WaitForAsync(jobId, j => j.OfKind(kind).Any(e => e.WorkerId == workerId), Generous, what, CancellationToken.None, TimeSpan.FromMilliseconds(100));

    Task<JobView> FormedAfterAsync(string jobId, long generation) =>
        Cluster.WaitForAsync(jobId, j => j.OfKind("formed").Any(e => e.Generation > generation), Generous,
                             $"a generation after {generation}", CancellationToken.None, TimeSpan.FromMilliseconds(100));

    /// <summary>Waits until the job runs generation ≥ 1 with <paramref name="world"/> workers and has committed a checkpoint and moved past it.</summary>
    Task<JobView> RunningPastACheckpointAsync(string jobId, int world) =>
        Cluster.WaitForAsync(jobId, j => j.State == "running" && j.Workers.Count == world && j.CommittedSteps.Count > 0 && j.Step > j.CommittedSteps[^1],
                             Generous, $"{jobId} running on {world} workers past a committed checkpoint", CancellationToken.None, TimeSpan.FromMilliseconds(50));

    /// <summary>
    /// A 3-worker job that, once it trains past a checkpoint, loses the worker of <paramref name="rank"/> to
    /// <paramref name="depart"/> (a signal or a REST leave); the scenario waits for that process to exit.
    /// </summary>
    async Task<(Outcome Outcome, string Victim, long Generation)> RunWithDepartureAsync(ChaosJob job, int rank, Func<string, Task> depart, TimeSpan exit)
    {
        string victim = "";
        long generation = 0;
        var o = await RunAsync(job, 3, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 3);
            generation = before.Generation;
            victim = before.Workers.Single(w => w.Rank == rank).WorkerId;
            await depart(victim);
            await Cluster.WaitForExitAsync(victim, exit, CancellationToken.None);
        });
        return (o, victim, generation);
    }

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
        var (o, victim, generation) = await RunWithDepartureAsync(job, 1, w => { Cluster.Signal(w, Signals.Kill); return Task.CompletedTask; },
                                                                  TimeSpan.FromSeconds(10));
        AssertCommon(o, job);
        var lost = o.Job.OfKind("worker_lost").Where(e => e.WorkerId == victim).ToList();
        Assert.True(lost.Count == 1, $"expected one worker_lost event for {victim}:\n{o.Job.Describe()}");
        Assert.Contains(o.Job.Events, e => e.Kind == "formed" && e.Generation > generation);
        AssertResumedFromReplica(o.Job, generation);
        Assert.Contains(o.Job.Events, e => e.Kind == "recovered" && e.Generation > generation && e.RecoverySeconds > 0);
        await AssertNoOrphansAsync(o.Instances);
    }

    /// <summary>
    /// How late past the heartbeat timeout (and its check period) a hung worker may be declared hung: measured 4.6–6.6 s
    /// after SIGSTOP with the 5 s timeout on the 2-core VM (docs/fault-tolerance.md), against this bound of 10.25 s.
    /// </summary>
    static readonly TimeSpan HungDetectionSlack = TimeSpan.FromSeconds(4);

    [Fact]
    public async Task HungWorkerIsNoticedWithinTheHeartbeatTimeoutAndComesBackOnlyAsANewWorker()
    {
        var job = fx.Job(1, 3);
        string victim = "";
        long generation = 0;
        DateTimeOffset stopped = default;
        var o = await RunAsync(job, 3, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 3);
            generation = before.Generation;
            victim = before.Workers.Single(w => w.Rank == 1).WorkerId;
            stopped = DateTimeOffset.UtcNow;
            Cluster.Signal(victim, Signals.Stop);
            var hung = Single(await EventAsync(id, "worker_hung", victim, $"the coordinator noticing {victim} hung"), "worker_hung", victim);
            await FormedAfterAsync(id, generation);
            Cluster.Signal(victim, Signals.Cont); // the zombie wakes up still believing in its old generation
            await Cluster.WaitForAsync(id, j => j.OfKind("worker_joined").Any(e => e.WorkerId == victim && e.At > hung.At), Generous,
                                       $"{victim} rejoining after it woke", CancellationToken.None, TimeSpan.FromMilliseconds(100));
        });
        AssertCommon(o, job);
        var hung = Single(o.Job, "worker_hung", victim);
        // Noticed within the heartbeat timeout: its last beat came at most when it was stopped, and the worker grain checks
        // every timeout/4. The slack covers a loaded 2-core machine (grain turns, the event write); a Coordinator that
        // missed heartbeats for longer, or never watched them, takes at least another timeout.
        var timeout = Cluster.Options.HeartbeatTimeout;
        var within = timeout + timeout / 4 + HungDetectionSlack;
        Assert.True(hung.At - stopped <= within && hung.At >= stopped,
                    $"{victim} was declared hung {(hung.At - stopped).TotalSeconds:F2} s after it was stopped; expected within the {timeout.TotalSeconds} s " +
                    $"heartbeat timeout + {(timeout / 4).TotalSeconds} s check period + {HungDetectionSlack.TotalSeconds} s slack");
        // Woken, the zombie either sends a report of its old generation first (refused: worker_fenced, told to rejoin) or
        // first reads the Stop the Coordinator queued on its stream when it declared it hung; which comes first is a race
        // of the wake-up. Either way it comes back only as a new worker, and nothing it sent for its old generation
        // counted (the exact ledger checked above).
        var fenced = o.Job.OfKind("worker_fenced").FirstOrDefault(e => e.WorkerId == victim && e.At >= hung.At);
        Single(o.Job, "worker_joined", victim, fenced?.At ?? hung.At);
        AssertResumedFromReplica(o.Job, generation);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task WorkerCutOffFromTheNetworkIsDroppedAndRejoinsWhenReconnected()
    {
        Assert.True(fx.NamespaceUnavailable is null, $"this scenario needs a network namespace: {fx.NamespaceUnavailable}");
        var ns = Cluster.Namespace!;
        var job = fx.Job(1, 3);
        string victim = "";
        long generation = 0;
        DateTimeOffset cut = default;
        var o = await RunAsync(job, 3, async (id, workers) =>
        {
            victim = workers[^1]; // the one in the namespace
            var before = await RunningPastACheckpointAsync(id, 3);
            generation = before.Generation;
            cut = DateTimeOffset.UtcNow;
            try
            {
                ns.Cut();
                // Silent, not closed: the coordinator notices the missing heartbeats (hung) or the stream's keepalive (lost).
                await Cluster.WaitForAsync(id, j => j.Events.Any(e => e.Kind is "worker_hung" or "worker_lost" && e.WorkerId == victim), Generous,
                                           $"the coordinator dropping {victim}", CancellationToken.None, TimeSpan.FromMilliseconds(100));
                await FormedAfterAsync(id, generation);
            }
            finally
            {
                ns.Reconnect();
            }
            await Cluster.WaitForAsync(id, j => j.OfKind("worker_joined").Any(e => e.WorkerId == victim && e.At > cut), Generous,
                                       $"{victim} rejoining after the reconnect", CancellationToken.None, TimeSpan.FromMilliseconds(100));
        }, namespaced: true);
        AssertCommon(o, job);
        Assert.Contains(o.Job.Events, e => e.Kind is "worker_hung" or "worker_lost" && e.WorkerId == victim && e.At > cut);
        Single(o.Job, "worker_joined", victim, cut);
        AssertResumedFromReplica(o.Job, generation);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task CoordinatorKilledAndRestartedReadoptsTheRunningGenerationWithoutRedoingSteps()
    {
        var job = fx.Job(1, 2);
        long generation = 0;
        int oldPid = 0;
        DateTimeOffset killed = default;
        var o = await RunAsync(job, 2, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 2);
            generation = before.Generation;
            oldPid = Cluster.Pid("coordinator");
            killed = DateTimeOffset.UtcNow;
            await Cluster.KillCoordinatorAsync(CancellationToken.None);
            // The workers notice their control stream broke; they keep training among themselves meanwhile.
            await Cluster.WaitForLineAsync(l => l.Contains("control stream") && l.Contains("lost") || l.Contains("unreachable"),
                                           Generous, "a worker noticing the coordinator is gone", CancellationToken.None, killed.UtcDateTime);
            await Cluster.RestartCoordinatorAsync(CancellationToken.None);
        });
        AssertCommon(o, job);
        Assert.False(File.Exists($"/proc/{oldPid}/cmdline") && File.ReadAllText($"/proc/{oldPid}/cmdline").Contains("Coordinator"),
                     $"the killed coordinator (pid {oldPid}) is still there");
        // Re-adopted: the generation running when the Coordinator died is the one that finished the job. No generation
        // formed after the kill, none resumed, so no step was redone.
        Assert.True(o.Job.Generation == generation, $"the job ended in generation {o.Job.Generation}, not the re-adopted {generation}:\n{o.Job.Describe()}");
        Assert.DoesNotContain(o.Job.Events, e => e.Kind is "formed" or "resumed" or "rescaling" && e.At > killed);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task WorkerJoiningMidRunGrowsTheJobFromTheLiveReplica()
    {
        var job = fx.Job(1, 3);
        string joiner = "";
        long generation = 0;
        var o = await RunAsync(job, 2, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 2);
            generation = before.Generation;
            joiner = Cluster.AddWorker();
            await Cluster.WaitForAsync(id, j => j.Workers.Any(w => w.WorkerId == joiner), Generous, $"{joiner} in a generation",
                                       CancellationToken.None, TimeSpan.FromMilliseconds(100));
        });
        AssertCommon(o, job);
        Single(o.Job, "worker_joined", joiner);
        Assert.Contains(o.Job.Events, e => e.Kind == "formed" && e.Generation > generation);
        AssertResumedFromReplica(o.Job, generation);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task WorkerLeavingOnSigtermIsReplacedByAReformationWithoutRedoingSteps()
    {
        var job = fx.Job(1, 3);
        var (o, victim, generation) = await RunWithDepartureAsync(job, 2, w => { Cluster.Signal(w, Signals.Term); return Task.CompletedTask; },
                                                                  TimeSpan.FromSeconds(60));
        AssertCommon(o, job);
        Single(o.Job, "worker_left", victim);
        Assert.DoesNotContain(o.Job.Events, e => e.Kind is "worker_lost" or "worker_hung" && e.WorkerId == victim);
        AssertResumedFromReplica(o.Job, generation);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task WorkerAskedToLeaveOverRestLeavesAndTheJobGoesOn()
    {
        var job = fx.Job(1, 3);
        var (o, victim, generation) = await RunWithDepartureAsync(job, 2, w => Cluster.LeaveOverRestAsync(w, CancellationToken.None),
                                                                  TimeSpan.FromSeconds(60));
        AssertCommon(o, job);
        Single(o.Job, "worker_left", victim);
        Assert.DoesNotContain(o.Job.Events, e => e.Kind is "worker_lost" or "worker_hung" && e.WorkerId == victim);
        AssertResumedFromReplica(o.Job, generation);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task BlobStorageStoppedAndRestartedLosesNoCommittedCheckpointAndTheJobCompletes()
    {
        var job = fx.Job(1, 2) with { KeepLast = 0 }; // retention deletes nothing: every committed step must still be there
        DateTimeOffset restarted = default;
        long dueDuringOutage = 0;
        IReadOnlyList<long> committedBefore = [], storedBefore = [];
        var o = await RunAsync(job, 2, async (id, workers) =>
        {
            var before = await RunningPastACheckpointAsync(id, 2);
            storedBefore = await Cluster.CommittedInStoreAsync(id, CancellationToken.None);
            committedBefore = before.CommittedSteps;
            await Cluster.StopAzuriteAsync(CancellationToken.None);
            try
            {
                // Training goes on while storage is down, through the next checkpoint step (or to the end).
                long due = (before.Step / job.CheckpointInterval + 1) * job.CheckpointInterval;
                dueDuringOutage = due;
                await Cluster.WaitForAsync(id, j => j.Step >= due || j.Terminal, Generous, $"step {due} while Azurite is down",
                                           CancellationToken.None, TimeSpan.FromMilliseconds(100));
            }
            finally
            {
                await Cluster.StartAzuriteAsync(CancellationToken.None);
                restarted = DateTimeOffset.UtcNow;
            }
        });
        AssertCommon(o, job);
        // Nothing committed before the outage was lost: the job and the store itself still list every step of then.
        var storedAfter = await Cluster.CommittedInStoreAsync(o.Job.JobId, CancellationToken.None);
        Assert.True(committedBefore.Count > 0 && committedBefore.All(storedBefore.Contains),
                    $"before the outage the job listed [{string.Join(", ", committedBefore)}], the store [{string.Join(", ", storedBefore)}]");
        Assert.True(storedBefore.All(storedAfter.Contains) && storedBefore.All(o.Job.CommittedSteps.Contains),
                    $"committed before the outage: [{string.Join(", ", storedBefore)}]; after it the store lists [{string.Join(", ", storedAfter)}], the job [{string.Join(", ", o.Job.CommittedSteps)}]");
        Assert.Superset(storedAfter.ToHashSet(), o.Job.CommittedSteps.ToHashSet()); // every step the job calls committed exists
        // The checkpoint due during the outage either committed once storage was back or says it was not committed.
        Assert.True(o.Job.CommittedSteps.Contains(dueDuringOutage) || o.Job.OfKind("checkpoint_not_committed").Any(),
                    $"the checkpoint of step {dueDuringOutage}, due while Azurite was down, neither committed nor reported as not committed:\n{o.Job.Describe()}");
        Assert.Contains(o.Job.Events, e => e.Kind == "checkpoint_committed" && e.At > restarted);
        Assert.Contains(job.Steps, o.Job.CommittedSteps);
        await AssertNoOrphansAsync(o.Instances);
    }

    [Fact]
    public async Task BlobStorageDownAtTheEndHoldsTheJobUntilItsFinalCheckpointCommits()
    {
        // Storage goes down early and stays down past the last step: training finishes, but the job is not completed while
        // its final weights are only in the workers' memory. They save the final checkpoint again until storage is back.
        var job = fx.Job(1, 2);
        DateTimeOffset restarted = default;
        var o = await RunAsync(job, 2, async (id, workers) =>
        {
            await RunningPastACheckpointAsync(id, 2);
            var down = DateTime.UtcNow;
            await Cluster.StopAzuriteAsync(CancellationToken.None);
            try
            {
                await Cluster.WaitForLineAsync(l => l.Contains($"the final checkpoint (step {job.Steps}) is not stored yet"), Generous,
                                               "a worker retrying the final checkpoint while Azurite is down", CancellationToken.None, down);
                var waiting = await Cluster.WaitForAsync(id, j => j.Step == job.Steps, Generous, $"step {job.Steps} trained", CancellationToken.None);
                Assert.True(waiting.State == "running" && !waiting.OfKind("completed").Any() && !waiting.CommittedSteps.Contains(job.Steps),
                            $"the job must wait for its final checkpoint while storage is down:\n{waiting.Describe()}");
            }
            finally
            {
                await Cluster.StartAzuriteAsync(CancellationToken.None);
                restarted = DateTimeOffset.UtcNow;
            }
        });
        AssertCommon(o, job);
        Assert.Contains(job.Steps, o.Job.CommittedSteps);
        Assert.Contains(o.Job.Events, e => e.Kind == "checkpoint_committed" && e.ResumeStep == job.Steps && e.At > restarted);
        Assert.Contains(o.Job.Events, e => e.Kind == "completed" && e.At > restarted);
        await AssertNoOrphansAsync(o.Instances);
    }
}
