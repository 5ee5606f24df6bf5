// Elastic re-formation as the Coordinator sees it: structured events for every transition, recovery timing, the
// exactly-once ledger across a resume, waiting below minWorkers, re-adoption after a restart, and fenced zombies.
using DeepSeekCluster.Contracts.Grains;
using K = DeepSeekCluster.Contracts.Grains.JobEventKinds;

namespace DeepSeekCluster.Coordinator.Tests;

public class ElasticityTests
{
    [Fact]
    public async Task LeaveLossAndGrowthAreEventsNamingTheWorkerAndReasonAndARecoveryIsTimed()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("events");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 20));
        await c.Worker("e1").RegisterAsync(TestSpecs.Worker("e1"), null);
        long e2 = await c.Worker("e2").RegisterAsync(TestSpecs.Worker("e2"), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation of two");
        long g = status.Generation;
        Assert.Equal([K.Submitted, K.Forming], status.Events.Take(2).Select(e => e.Kind));
        Assert.Contains(status.Events, e => e.Kind == K.Formed && e.Generation == g);
        Assert.Equal(["e1", "e2"], status.Events.Where(e => e.Kind == K.WorkerJoined).Select(e => e.WorkerId).Order());

        await job.ReportResumedAsync(g, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 3; step++) await job.ReportStepAsync(g, new StepReport { Step = step, Loss = 5 });

        // A graceful leave: worker_left with the worker and the reason, then rescaling, then a generation of one.
        await c.Worker("e2").DisconnectedAsync(e2, "leaving: asked to leave", LeaveKind.Left);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 1, "re-formation without e2");
        var left = Assert.Single(status.Events, e => e.Kind == K.WorkerLeft);
        Assert.Equal(("e2", "leaving: asked to leave"), (left.WorkerId, left.Reason));
        Assert.Contains(status.Events, e => e.Kind == K.Rescaling && e.WorkerId == "e2");

        // The survivor resumes from its live state: nothing redone; its first step ends the recovery, timed in parts.
        await job.ReportResumedAsync(g + 1, new ResumedReport { Step = 3, Source = "replica", SourceRank = 0, RestoreSeconds = 0.25, StateBytes = 1234 });
        await job.ReportStepAsync(g + 1, new StepReport { Step = 4, Loss = 4 });
        status = await job.GetStatusAsync();
        var resumed = status.Events.Last(e => e.Kind == K.Resumed);
        Assert.Equal((3L, "replica", 0L, 0, 1234L), (resumed.ResumeStep, resumed.ResumeSource, resumed.StepsRedone, resumed.SourceRank, resumed.StateBytes));
        // (The growth from one to two workers at the start was a recovery too: from "grow".)
        var recovered = Assert.Single(status.Events, e => e.Kind == K.Recovered && e.Reason == K.WorkerLeft);
        Assert.True(recovered.RecoverySeconds > 0);
        Assert.NotNull(recovered.FormationSeconds);
        Assert.NotNull(recovered.RestoreSeconds);
        Assert.NotNull(recovered.FirstStepSeconds);
        Assert.Equal(recovered.RecoverySeconds!.Value, recovered.FormationSeconds!.Value + recovered.RestoreSeconds!.Value + recovered.FirstStepSeconds!.Value, 3);

        // A new worker: the job grows at once (rescaling for "grow", a formed generation of two).
        long e3 = await c.Worker("e3").RegisterAsync(TestSpecs.Worker("e3"), null);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 2, "growth to two");
        Assert.Contains(status.Events, e => e.Kind == K.Rescaling && e.Reason == "grow");
        Assert.Contains(status.Events, e => e.Kind == K.WorkerJoined && e.WorkerId == "e3");
        Assert.Equal(["e1", "e3"], status.Workers.Select(w => w.WorkerId).Order());

        // A broken stream is a lost worker.
        await c.Worker("e3").DisconnectedAsync(e3, "connection lost", LeaveKind.Lost);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.WorkerLost), "worker_lost");
        Assert.Equal(("e3", "connection lost"), status.Events.Where(e => e.Kind == K.WorkerLost).Select(e => (e.WorkerId, e.Reason)).Single());
        Assert.All(status.Events, e => Assert.Contains(e.Kind, K.All));
    }

    [Fact]
    public async Task AWorkerWhoseHeartbeatsStopIsHungAndWhenItWakesItIsFencedAndToldToRejoin()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder(), heartbeatTimeout: TimeSpan.FromSeconds(2));
        // 2 s against z1's beat every 50 ms: under CI load a 400 ms timeout also took z1 once, leaving the job no worker.
        var job = c.Job("zombie");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 20));
        await c.Worker("z1").RegisterAsync(TestSpecs.Worker("z1"), null);
        await c.Worker("z2").RegisterAsync(TestSpecs.Worker("z2"), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation of two");
        long stale = status.Generation;

        // z1 keeps beating for whatever generation it holds; z2 is paused (SIGSTOP) and says nothing.
        using var beating = new CancellationTokenSource();
        var beats = Task.Run(async () =>
        {
            while (!beating.IsCancellationRequested)
            {
                var w = await c.Worker("z1").GetAsync();
                try { await c.Worker("z1").HeartbeatAsync(w.Generation, new WorkerMetrics()); } catch (StaleGenerationException) { }
                await Task.Delay(50); // the beat's period, as a worker's heartbeat has one
            }
        });
        try
        {
            status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation > stale, "re-formation without the hung worker");
            var hung = Assert.Single(status.Events, e => e.Kind == K.WorkerHung);
            Assert.Equal("z2", hung.WorkerId);
            Assert.Contains("no heartbeat", hung.Reason);
            Assert.Equal(["z1"], status.Workers.Select(w => w.WorkerId));

            // It wakes (SIGCONT): its heartbeat, step and checkpoint of the old generation are refused, and it is told to rejoin.
            var refused = await Assert.ThrowsAsync<StaleGenerationException>(() => c.Worker("z2").HeartbeatAsync(stale, new WorkerMetrics()));
            Assert.True(refused.Rejoin);
            await Assert.ThrowsAsync<StaleGenerationException>(() => job.ReportStepAsync(stale, new StepReport { Rank = 1, Step = 9 }));
            await Assert.ThrowsAsync<StaleGenerationException>(() => job.ReportCheckpointAsync(stale, new CheckpointReport { Rank = 1, Step = 9 }));
            status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.WorkerFenced), "worker_fenced");
            var fenced = Assert.Single(status.Events, e => e.Kind == K.WorkerFenced);
            Assert.Equal("z2", fenced.WorkerId);
            Assert.NotEqual(9, status.Step);

            // It says Hello again as a free worker: the job claims it back and grows to maxWorkers.
            await c.Worker("z2").RegisterAsync(TestSpecs.Worker("z2"), null);
            status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "growth back to two");
            Assert.Contains(status.Workers, w => w.WorkerId == "z2");
        }
        finally
        {
            beating.Cancel();
            await beats;
        }
    }

    [Fact]
    public async Task AResumeFromTheCheckpointCountsRedoneStepsAndTheLedgerDropsThem()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("ledger");
        var spec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 5); // global batch 8
        await job.SubmitAsync(spec);
        long w1 = await c.Worker("l1").RegisterAsync(TestSpecs.Worker("l1"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 3; step++) await job.ReportStepAsync(1, Slice(step, 0, 8));
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(2, 1, 1, 100));
        var status = await job.GetStatusAsync();
        Assert.Equal([[0L, 24L]], status.Consumption.Ranges);
        Assert.True(status.Consumption.Complete);

        // The only worker dies after step 3; the next one resumes from the committed step 2: step 3 is redone.
        await c.Worker("l1").DisconnectedAsync(w1, "killed", LeaveKind.Lost);
        await c.Worker("l2").RegisterAsync(TestSpecs.Worker("l2"), null);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "re-formation");
        Assert.Equal(2, (await c.Worker("l2").GetAsync()).Assignment!.ResumeStep);
        await job.ReportResumedAsync(2, new ResumedReport { Step = 2, Source = "checkpoint" });
        status = await job.GetStatusAsync();
        var resumed = status.Events.Last(e => e.Kind == K.Resumed);
        Assert.Equal((2L, "checkpoint", 1L), (resumed.ResumeStep, resumed.ResumeSource, resumed.StepsRedone));
        Assert.Equal([[0L, 16L]], status.Consumption.Ranges); // step 3's samples belong to a discarded state
        Assert.Equal(2, status.Step);

        // The one worker redoes 3..4; the last step is reported by two halves, and the final checkpoint's commit completes
        // the job: a half reported after it still counts, and the ledger is exactly 5 global batches.
        for (int step = 3; step <= 4; step++) await job.ReportStepAsync(2, Slice(step, 0, 8));
        await job.ReportStepAsync(2, Slice(5, 0, 4));
        Assert.Equal(JobState.Running, (await job.GetStatusAsync()).State);
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(5, 2, 1, 100));
        Assert.Equal(JobState.Completed, (await job.GetStatusAsync()).State);
        await job.ReportStepAsync(2, Slice(5, 4, 4));
        status = await job.GetStatusAsync();
        Assert.Equal(JobState.Completed, status.State);
        Assert.Equal((40L, true, 0L), (status.Consumption.Samples, status.Consumption.Complete, status.Consumption.Overlaps));
        Assert.Equal([[0L, 40L]], status.Consumption.Ranges);
        Assert.Equal([1L, 2L, 3L, 4L, 5L], status.Loss.Select(p => p.Step));
    }

    [Fact]
    public async Task AGenerationThatResumesAtTheLastStepOwnsTheFinalCheckpointWhoseCommitCompletesTheJob()
    {
        // The race a chaos run found: a worker joins, and the old generation finishes the last step before it stops; its
        // step reports cross the re-formation and are refused. The new generation resumes at the last step with nothing
        // to train: it saves the final checkpoint, whose commit completes the job, and the late reports fill the ledger.
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("ends-in-growth");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 3)); // global batch 8
        await c.Worker("r1").RegisterAsync(TestSpecs.Worker("r1"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 2; step++) await job.ReportStepAsync(1, Slice(step, 0, 8));

        await c.Worker("r2").RegisterAsync(TestSpecs.Worker("r2"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "growth to two");
        await Assert.ThrowsAsync<StaleGenerationException>(() => job.ReportStepAsync(1, Slice(3, 0, 8)));
        Assert.Equal(JobState.Running, (await job.GetStatusAsync()).State);

        await job.ReportResumedAsync(2, new ResumedReport { Step = 3, Source = "replica", SourceRank = 0 });
        var status = await job.GetStatusAsync();
        Assert.Equal((JobState.Running, 3L), (status.State, status.Step));
        Assert.Equal([[0L, 24L]], status.Consumption.Ranges);
        Assert.True(status.Consumption.Complete);

        Assert.False(await job.ReportCheckpointAsync(2, new CheckpointReport { Step = 3, Rank = 0 }));
        Assert.True(await job.ReportCheckpointAsync(2, new CheckpointReport { Step = 3, Rank = 1 }));
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(3, 2, 2, 100));
        status = await job.GetStatusAsync();
        Assert.Equal((JobState.Completed, 3L), (status.State, status.Step));
        Assert.Equal(3, status.Committed.Single().Step);
    }

    [Fact]
    public async Task AMemberLostAfterTheLastStepBeforeItsFinalShardReformsAndTheSurvivorCommitsTheFinalCheckpoint()
    {
        // Both ranks report the last step; rank 0 uploads its shard of the final checkpoint and rank 1 dies before its
        // own. The job must not complete without its final weights: it re-forms on the survivor, which resumes at the last
        // step from its live state and saves the whole checkpoint alone.
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("dies-at-the-end");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 2)); // global batch 8
        await c.Worker("e1").RegisterAsync(TestSpecs.Worker("e1"), null);
        long e2 = await c.Worker("e2").RegisterAsync(TestSpecs.Worker("e2"), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation");
        long g = status.Generation;
        await job.ReportResumedAsync(g, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 2; step++)
        {
            await job.ReportStepAsync(g, Slice(step, 0, 4));
            await job.ReportStepAsync(g, Slice(step, 4, 4));
        }
        Assert.False(await job.ReportCheckpointAsync(g, new CheckpointReport { Step = 2, Rank = 0 }));
        status = await job.GetStatusAsync();
        Assert.Equal((JobState.Running, 2L), (status.State, status.Step));

        await c.Worker("e2").DisconnectedAsync(e2, "killed", LeaveKind.Lost);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 1, "re-formation on the survivor");
        Assert.Equal(["e1"], status.Workers.Select(w => w.WorkerId));
        await job.ReportResumedAsync(g + 1, new ResumedReport { Step = 2, Source = "replica", SourceRank = 0 });
        Assert.Equal(JobState.Running, (await job.GetStatusAsync()).State);
        Assert.True(await job.ReportCheckpointAsync(g + 1, new CheckpointReport { Step = 2, Rank = 0 }));
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(2, g + 1, 1, 100));

        status = await job.GetStatusAsync();
        Assert.Equal((JobState.Completed, 2L), (status.State, status.Step));
        Assert.Equal((2L, g + 1), (status.Committed.Single().Step, status.Committed.Single().Generation));
        Assert.Equal(0, status.Events.Single(e => e.Kind == K.Resumed && e.Generation == g + 1).StepsRedone);
        Assert.Equal([[0L, 16L]], status.Consumption.Ranges);
    }

    [Fact]
    public async Task StepReportsResentAfterAReconnectFillALostStepAndAreNotCountedTwice()
    {
        // A Coordinator killed just after both ranks wrote their step-2 reports never processed them; on reconnecting into
        // the same generation the workers send their recent reports again, steps 1 and 3 included.
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("resent");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 4)); // global batch 8
        await c.Worker("s1").RegisterAsync(TestSpecs.Worker("s1"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        await job.ReportStepAsync(1, Slice(1, 0, 8));
        await job.ReportStepAsync(1, Slice(3, 0, 8));
        Assert.Equal([[0L, 8L], [16L, 24L]], (await job.GetStatusAsync()).Consumption.Ranges);

        foreach (long step in new long[] { 1, 2, 3 }) await job.ReportStepAsync(1, Slice(step, 0, 8) with { Resent = true });
        var status = await job.GetStatusAsync();
        Assert.Equal([[0L, 24L]], status.Consumption.Ranges);
        Assert.Equal((24L, true, 0L), (status.Consumption.Samples, status.Consumption.Complete, status.Consumption.Overlaps));

        // The same slice sent twice without the flag is an overlap, as before: the flag is what makes a resend harmless.
        await job.ReportStepAsync(1, Slice(3, 0, 8));
        Assert.Equal(8, (await job.GetStatusAsync()).Consumption.Overlaps);
    }

    [Fact]
    public async Task AFinalCheckpointThatCannotCommitCompletesTheJobSayingSo()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("uncommitted-end");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 2));
        await c.Worker("u1").RegisterAsync(TestSpecs.Worker("u1"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 2; step++) await job.ReportStepAsync(1, Slice(step, 0, 8));

        // A rank that could not store its final file keeps the job waiting (it saves again); the event names it.
        await job.ReportCheckpointFailedAsync(1, 2, 0, "could not store its file: Unavailable: blob storage at http://127.0.0.1:1 failed to upload");
        var waiting = await job.GetStatusAsync();
        Assert.Equal(JobState.Running, waiting.State);
        Assert.Contains("rank 0 could not store its file: Unavailable: blob storage at http://127.0.0.1:1", waiting.Events.Last(e => e.Kind == K.CheckpointNotCommitted).Message);

        // An earlier step that cannot commit changes nothing; the final one ends the wait with the reason.
        await job.CheckpointNotCommittedAsync(1, 1, "hash mismatch in rank-0.safetensors");
        Assert.Equal(JobState.Running, (await job.GetStatusAsync()).State);
        await job.CheckpointNotCommittedAsync(1, 2, "the checkpoint store at http://store could not be reached after 5 attempts");
        var status = await job.GetStatusAsync();
        Assert.Equal(JobState.Completed, status.State);
        Assert.Contains("the final checkpoint was not committed: the checkpoint store at http://store", status.Events.Last(e => e.Kind == K.Completed).Message);
        Assert.Empty(status.Committed);
    }

    [Fact]
    public async Task ACollectiveThatFailsWhileEveryMemberHeartbeatsReformsTheJobWithTheSameWorkers()
    {
        // The hang a recovery run found: a new generation's ring never connected, both workers stayed online and waited
        // for an assignment, and nothing re-formed the job. A rank's CollectiveFailed report now does.
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("broken-ring");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2));
        await c.Worker("b1").RegisterAsync(TestSpecs.Worker("b1"), null);
        await c.Worker("b2").RegisterAsync(TestSpecs.Worker("b2"), null);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation");
        long g = status.Generation;

        await job.ReportCollectiveFailedAsync(g, "b2", "rank 1: rank 0 closed its connection");
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 1, "re-formation");
        Assert.Equal(["b1", "b2"], status.Workers.Select(w => w.WorkerId).Order());
        var rescaling = status.Events.Last(e => e.Kind == K.Rescaling);
        Assert.Equal(("collective_failed", "b2"), (rescaling.Reason, rescaling.WorkerId));
        Assert.Equal(g + 1, (await c.Worker("b1").GetAsync()).Assignment!.Generation);

        // The other rank of the broken ring reports the same generation: already replaced, nothing happens.
        await job.ReportCollectiveFailedAsync(g, "b1", "rank 0: rank 1 did not connect within the timeout");
        status = await job.GetStatusAsync();
        Assert.Equal((JobState.Running, g + 1), (status.State, status.Generation));
        Assert.Single(status.Events, e => e.Kind == K.Rescaling && e.Reason == "collective_failed");
    }

    [Fact]
    public async Task BelowMinWorkersTheJobWaitsInRescalingAndResumesWhenAWorkerReturns()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("waits");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2));
        await c.Worker("m1").RegisterAsync(TestSpecs.Worker("m1"), null);
        long m2 = await c.Worker("m2").RegisterAsync(TestSpecs.Worker("m2"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");

        await c.Worker("m2").DisconnectedAsync(m2, "killed", LeaveKind.Lost);
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Rescaling), "rescaling");
        // One survivor cannot make minWorkers 2: no new generation forms, the job shows Rescaling.
        status = await job.GetStatusAsync();
        Assert.Equal((JobState.Rescaling, 1L), (status.State, status.Generation));
        Assert.DoesNotContain(status.Events, e => e.Kind == K.Formed && e.Generation == 2);

        await c.Worker("m3").RegisterAsync(TestSpecs.Worker("m3"), null);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "resumption with a returned worker");
        Assert.Equal(["m1", "m3"], status.Workers.Select(w => w.WorkerId).Order());
    }

    [Fact]
    public async Task AfterACoordinatorRestartAWorkerThatStillTrainsItsGenerationIsReadoptedAndAnotherIsNot()
    {
        string folder = TestSpecs.TempFolder();
        long generation;
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            await c.Job("adopt").SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 50));
            await c.Worker("a1").RegisterAsync(TestSpecs.Worker("a1"), null);
            await c.Worker("a2").RegisterAsync(TestSpecs.Worker("a2"), null);
            var formed = await TestSpecs.EventuallyAsync(c.Job("adopt").GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation");
            generation = formed.Generation;
            await c.Job("adopt").ReportStepAsync(generation, new StepReport { Step = 1, Loss = 6 });
        }
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            var before = await c.Job("adopt").GetStatusAsync();
            Assert.Equal((JobState.Running, generation, 1L), (before.State, before.Generation, before.Step));
            var a1 = (await c.Worker("a1").GetAsync()).Assignment!;

            // a1 reconnects saying it still trains the generation as its rank: re-adopted, nothing re-forms.
            await c.Worker("a1").RegisterAsync(TestSpecs.Worker("a1"), null, new TrainingPosition("adopt", generation, a1.Rank));
            var status = await c.Job("adopt").GetStatusAsync();
            Assert.Equal((JobState.Running, generation), (status.State, status.Generation));
            Assert.Equal(generation, (await c.Worker("a1").GetAsync()).Assignment?.Generation);
            await c.Worker("a1").HeartbeatAsync(generation, new WorkerMetrics { Step = 2 });
            await c.Job("adopt").ReportStepAsync(generation, new StepReport { Step = 2, Loss = 5 });

            // a2 comes back as a new process (no position): its old assignment is lost and the job re-forms.
            await c.Worker("a2").RegisterAsync(TestSpecs.Worker("a2"), null);
            status = await TestSpecs.EventuallyAsync(c.Job("adopt").GetStatusAsync, s => s.Events.Any(e => e.Kind == K.WorkerLost && e.WorkerId == "a2"), "a2 lost");
            Assert.DoesNotContain(status.Events, e => e.WorkerId == "a1" && e.Kind is K.WorkerLost or K.WorkerLeft or K.WorkerHung);
            Assert.Equal(2, status.Step);
        }
    }

    [Fact]
    public void TheLedgerShowsGapsAndOverlapsAndFoldsCompleteSteps()
    {
        var ledger = new Grains.SampleLedger();
        ledger.Add(1, 0, 4, 8);
        ledger.Add(1, 4, 4, 8);
        ledger.Add(2, 8, 4, 8); // step 2's second half never arrives
        ledger.Add(3, 16, 8, 8);
        Assert.Equal(1, ledger.Prefix);
        var s = ledger.Summary(8);
        Assert.False(s.Complete);
        Assert.Equal([[0L, 12L], [16L, 24L]], s.Ranges);
        Assert.Equal(20, s.Samples);

        ledger.Add(2, 12, 4, 8);
        Assert.Equal(3, ledger.Prefix);
        Assert.True(ledger.Summary(8).Complete);

        ledger.Add(2, 8, 4, 8); // a repeated report of step 2: an overlap, visible
        s = ledger.Summary(8);
        Assert.Equal((false, 4L, 24L), (s.Complete, s.Overlaps, s.Samples));

        ledger.DropAfter(1, 8); // resumed at step 1: steps 2 and 3 and the repeat are gone
        s = ledger.Summary(8);
        Assert.Equal((true, 0L, 8L), (s.Complete, s.Overlaps, s.Samples));
        Assert.Equal([[0L, 8L]], s.Ranges);
    }

    [Fact]
    public void AResumeCompletesAStepThatOneRankReportedOnlyInPartAndCountsTheInference()
    {
        var ledger = new Grains.SampleLedger();
        ledger.Add(1, 0, 4, 8);
        ledger.Add(1, 4, 4, 8);
        ledger.Add(2, 8, 4, 8);  // rank 1 of step 2 was killed after the all-reduce, before its report
        ledger.Add(4, 24, 4, 8); // step 3 nobody reported: a real gap
        ledger.ResumedAt(4, 8);
        var s = ledger.Summary(8);
        Assert.Equal(8L, s.Inferred); // step 2's other half and step 4's other half
        Assert.False(s.Complete);      // step 3 stays missing
        Assert.Equal([[0L, 16L], [24L, 32L]], s.Ranges);
    }

    [Fact]
    public void ALateReportOfThePreviousGenerationFillsItsStepOnceAndNeverOverlaps()
    {
        var ledger = new Grains.SampleLedger();
        ledger.Add(1, 0, 8, 8);
        ledger.ResumedAt(2, 8); // generation 2 resumed from a replica at step 2 before step 2's reports arrived
        Assert.Equal(8L, ledger.Summary(8).Samples);
        Assert.True(ledger.AddLate(2, 8, 4, 8));
        Assert.True(ledger.AddLate(2, 12, 4, 8));
        Assert.False(ledger.AddLate(2, 12, 4, 8)); // the same slice again: already known, not an overlap
        Assert.False(ledger.AddLate(1, 0, 8, 8));  // a complete step: only a confirmation
        var s = ledger.Summary(8);
        Assert.Equal((true, 0L, 16L), (s.Complete, s.Overlaps, s.Samples));
    }

    static StepReport Slice(long step, int offset, int count) =>
        new() { Step = step, Loss = 10 - step, SampleStart = (step - 1) * 8 + offset, SampleCount = count };
}
