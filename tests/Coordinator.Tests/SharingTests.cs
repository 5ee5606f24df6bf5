// Sharing the cluster (docs/agent.md): priorities with preemption, per-tenant quotas, and the order in which waiting jobs
// get free workers, on the real Coordinator grains (the tests play the workers' and the store's parts, as ElasticityTests).
using DeepSeekCluster.Contracts.Grains;
using K = DeepSeekCluster.Contracts.Grains.JobEventKinds;

namespace DeepSeekCluster.Coordinator.Tests;

public class SharingTests
{
    static JobSpec Spec(int workers, int steps, int priority = 0, string? tenant = null, int? maxWorkers = null) =>
        TestSpecs.Tiny(minWorkers: workers, maxWorkers: maxWorkers ?? workers, steps: steps) with { Priority = priority, Tenant = tenant };

    /// <summary>Step <paramref name="step"/>'s whole global batch of 8, reported by one rank.</summary>
    static StepReport Step(long step) => new() { Step = step, Loss = 10 - step, SampleStart = (step - 1) * 8, SampleCount = 8 };

    static IClusterRegistryGrain Registry(GrainCluster c) => c.Grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);

    /// <summary>low (2 workers, 6 steps) trained steps 1..3 with step 2 committed when high (priority 5, 2 workers) arrives.</summary>
    static async Task<(ITrainingJobGrain Low, ITrainingJobGrain High)> PreemptAfterStep3Async(GrainCluster c)
    {
        var low = c.Job("low");
        await low.SubmitAsync(Spec(workers: 2, steps: 6));
        await c.Worker("p1").RegisterAsync(TestSpecs.Worker("p1"), null);
        await c.Worker("p2").RegisterAsync(TestSpecs.Worker("p2"), null);
        await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "low formed");
        await low.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 3; step++) await low.ReportStepAsync(1, Step(step));
        await low.CheckpointCommittedAsync(new CommittedCheckpoint(2, 1, 2, 100));
        var high = c.Job("high");
        await high.SubmitAsync(Spec(workers: 2, steps: 2, priority: 5));
        return (low, high);
    }

    /// <summary>high trains its two steps on the workers low let go, and completes (giving them back).</summary>
    static async Task RunHighToCompletionAsync(ITrainingJobGrain high)
    {
        var status = await TestSpecs.EventuallyAsync(high.GetStatusAsync, s => s.State == JobState.Running, "high formed on low's workers");
        Assert.Equal(["p1", "p2"], status.Workers.Select(w => w.WorkerId).Order());
        await high.ReportResumedAsync(status.Generation, new ResumedReport { Step = 0, Source = "start" });
        for (int step = 1; step <= 2; step++) await high.ReportStepAsync(status.Generation, Step(step));
        await high.CheckpointCommittedAsync(new CommittedCheckpoint(2, status.Generation, 2, 100));
        status = await high.GetStatusAsync();
        Assert.Equal(JobState.Completed, status.State);
        Assert.Equal((16L, true, 0L), (status.Consumption.Samples, status.Consumption.Complete, status.Consumption.Overlaps));
    }

    [Fact]
    public async Task APreemptedJobCheckpointsTheStepItHoldsBeforeReleasingItsWorkersAndResumesThereRedoingNothing()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var (low, high) = await PreemptAfterStep3Async(c);

        // No worker is free: high takes low's two, but only after low's members saved the step they hold. They form a
        // checkpoint-only generation on the same workers; high waits.
        var p1 = (await TestSpecs.EventuallyAsync(() => c.Worker("p1").GetAsync(), w => w.Assignment?.Generation == 2, "low's checkpoint-only generation")).Assignment!;
        Assert.Equal(("low", true), (p1.JobId, p1.CheckpointOnly));
        var lowStatus = await low.GetStatusAsync();
        Assert.Equal(JobState.Rescaling, lowStatus.State);
        Assert.Equal("preempted by high", Assert.Single(lowStatus.Events, e => e.Kind == K.Preempted).Reason);
        var decision = Assert.Single(await Registry(c).ListDecisionsAsync(), d => d.Kind == "preempt");
        Assert.Equal(("low", "high"), (decision.JobId, decision.For));
        Assert.Equal(["p1", "p2"], decision.Workers.Order());

        // The ranks finish the step in flight (4), stop, resume from their live states at 4 and save it: until the store
        // commits it the workers stay with low. Step 4's report crossed the re-formation: refused to the rank, but its
        // samples belong to the state the new generation resumes from.
        await Assert.ThrowsAsync<StaleGenerationException>(() => low.ReportStepAsync(1, Step(4)));
        await low.ReportResumedAsync(2, new ResumedReport { Step = 4, Source = "replica", SourceRank = 0 });
        Assert.Equal([[0L, 32L]], (await low.GetStatusAsync()).Consumption.Ranges);
        await low.ReportCheckpointAsync(2, new CheckpointReport { Rank = 0, Step = 4, File = "rank-0.safetensors", ManifestJson = "{}" });
        Assert.True(await low.ReportCheckpointAsync(2, new CheckpointReport { Rank = 1, Step = 4, File = "rank-1.safetensors" }));
        Assert.Contains(c.Handed.Commits, h => h.JobId == "low" && h.Record.Step == 4 && h.Record.Generation == 2);
        var highStatus = await high.GetStatusAsync();
        Assert.Equal((JobState.Forming, 0), (highStatus.State, highStatus.Workers.Length));
        Assert.Equal("low", (await c.Worker("p1").GetAsync()).Assignment!.JobId);

        await low.CheckpointCommittedAsync(new CommittedCheckpoint(4, 2, 2, 100));
        var released = Assert.Single((await low.GetStatusAsync()).Events, e => e.Kind == K.Released);
        Assert.Equal(("checkpointed", 4L, 0L), (released.Reason, released.ResumeStep, released.StepsRedone));
        await RunHighToCompletionAsync(high);

        // low forms again from the checkpoint of step 4: nothing is redone.
        lowStatus = await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 3, "low re-formed");
        Assert.Equal((4L, false), ((await c.Worker("p1").GetAsync()).Assignment!.ResumeStep, (await c.Worker("p1").GetAsync()).Assignment!.CheckpointOnly));
        await low.ReportResumedAsync(3, new ResumedReport { Step = 4, Source = "checkpoint" });
        for (int step = 5; step <= 6; step++) await low.ReportStepAsync(3, Step(step));
        await low.CheckpointCommittedAsync(new CommittedCheckpoint(6, 3, 2, 100));
        lowStatus = await low.GetStatusAsync();
        Assert.Equal(JobState.Completed, lowStatus.State);
        // The ledger: the six global batches once each, no gap, no overlap, and no step redone by any generation.
        Assert.Equal((48L, true, 0L), (lowStatus.Consumption.Samples, lowStatus.Consumption.Complete, lowStatus.Consumption.Overlaps));
        Assert.Equal([[0L, 48L]], lowStatus.Consumption.Ranges);
        Assert.All(lowStatus.Events.Where(e => e.Kind == K.Resumed), e => Assert.Equal(0L, e.StepsRedone));
        Assert.Contains(lowStatus.Events, e => e.Kind == K.Recovered && e.Reason == K.Preempted);
    }

    [Fact]
    public async Task APreemptedJobWhoseCheckpointDoesNotCommitWithinTheBoundReleasesItsWorkersAndSaysItRedoesFromTheLastCommittedOne()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder(), options: o => o.PreemptionCheckpointTimeout = TimeSpan.FromMilliseconds(300));
        var (low, high) = await PreemptAfterStep3Async(c);

        // The checkpoint-only generation never reports (its ranks hang, or the store is slow): after the bound the workers go.
        await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Formed && e.Reason == "preemption_checkpoint"), "low's checkpoint-only generation");
        await RunHighToCompletionAsync(high);
        var lowStatus = await low.GetStatusAsync();
        var released = Assert.Single(lowStatus.Events, e => e.Kind == K.Released);
        Assert.Equal(("checkpoint_timeout", 2L, 1L), (released.Reason, released.ResumeStep, released.StepsRedone));
        Assert.Contains("without a checkpoint at preemption (no checkpoint committed within 0.3 s)", released.Message);

        // low resumes from its committed step 2; step 3 is redone and its first consumption is dropped from the ledger.
        await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 3, "low re-formed");
        Assert.Equal(2, (await c.Worker("p1").GetAsync()).Assignment!.ResumeStep);
        await low.ReportResumedAsync(3, new ResumedReport { Step = 2, Source = "checkpoint" });
        lowStatus = await low.GetStatusAsync();
        Assert.Equal([[0L, 16L]], lowStatus.Consumption.Ranges);
        Assert.Equal(1L, lowStatus.Events.Last(e => e.Kind == K.Resumed).StepsRedone);
    }

    [Fact]
    public async Task APreemptedJobWhoseCheckpointSaveFailsReleasesItsWorkersAtOnceAndSaysWhy()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder()); // the default bound: 60 s
        var (low, high) = await PreemptAfterStep3Async(c);
        await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Formed && e.Reason == "preemption_checkpoint"), "low's checkpoint-only generation");
        await low.ReportResumedAsync(2, new ResumedReport { Step = 3, Source = "replica", SourceRank = 0 });

        // Rank 1 cannot store its file: the checkpoint will never commit, so the workers go now, not at the bound.
        await low.ReportCheckpointFailedAsync(2, 3, 1, "could not store its file: no space left on device");
        var released = Assert.Single((await low.GetStatusAsync()).Events, e => e.Kind == K.Released);
        Assert.Equal(("checkpoint_failed", 2L, 1L), (released.Reason, released.ResumeStep, released.StepsRedone));
        Assert.Contains("rank 1's save of step 3 failed", released.Message);
        await RunHighToCompletionAsync(high);
    }

    [Fact]
    public async Task WithinAPriorityTheJobWaitingLongestGetsFreeWorkersFirstAndAHigherPriorityGoesBeforeIt()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        // Submitted in this order, all waiting: a needs 2 workers, b and d one each; h (priority 1) comes last.
        foreach (var (id, spec) in new[] { ("a", Spec(2, 5)), ("b", Spec(1, 5)), ("d", Spec(1, 5)), ("h", Spec(1, 5, priority: 1)) })
            await c.Job(id).SubmitAsync(spec);

        // One worker at a time, each handed out only after the last one's effect is seen. Every waiting job hears of
        // each worker and claims in whatever order the calls land; the rule alone decides who gets it.
        async Task<JobStatus> Offer(string worker, string job, Func<JobStatus, bool> seen)
        {
            await c.Worker(worker).RegisterAsync(TestSpecs.Worker(worker), null);
            return await TestSpecs.EventuallyAsync(c.Job(job).GetStatusAsync, seen, $"{worker} reached {job}");
        }
        await Offer("w1", "h", s => s.State == JobState.Running);                                   // priority first
        await Offer("w2", "a", s => s.Events.Any(e => e.Kind == K.WorkerJoined && e.WorkerId == "w2")); // a holds it: b cannot pass a
        await Offer("w3", "a", s => s.State == JobState.Running);
        await Offer("w4", "b", s => s.State == JobState.Running);                                   // b waited longer than d
        await Offer("w5", "d", s => s.State == JobState.Running);

        var assigned = (await Registry(c).ListDecisionsAsync()).Where(d => d.Kind == "assigned").Select(d => (d.JobId, string.Join(",", d.Workers)));
        Assert.Equal([("h", "w1"), ("a", "w2"), ("a", "w3"), ("b", "w4"), ("d", "w5")], assigned);
    }

    [Fact]
    public void AClaimGetsOnlyTheFreeWorkersLeftAfterTheJobsAheadAndSaysWhoHeldThemUnlessTheyCannotFormHere()
    {
        var state = new Grains.ClusterRegistryGrainState();
        void Worker(string id, string? job) => state.Workers[id] = new Grains.RegisteredWorker
            { Capabilities = TestSpecs.Worker(id), Online = true, JobId = job, Since = state.Workers.Count + 1 };
        void Waiting(string job, int priority, int need, long since)
        {
            state.Shares[job] = new Grains.ShareRecord { Share = new JobShare(priority, "default", need), WaitingSince = since, Order = since };
            state.Waiting[job] = JobWait.ToForm;
        }
        Worker("w1", null);
        Worker("w2", "a");
        Worker("w3", null);
        Waiting("a", priority: 0, need: 3, since: 10); // holds w2, lacks 2
        Waiting("b", priority: 0, need: 1, since: 11);
        var policy = new Grains.SharePolicy(state, new Dictionary<string, int>());

        Assert.Equal((2, null, null), policy.Allowed("a", 2));
        var (count, kind, why) = policy.Allowed("b", 1);
        Assert.Equal((0, "held"), (count, kind));
        Assert.Equal("2 of 2 free workers kept for jobs ahead in the queue: a (priority 0, needs 2); 0 of 1 given", why);
        // A newcomer of a higher priority is ahead of both; one of the same priority that has not waited yet is behind both.
        state.Shares["h"] = new Grains.ShareRecord { Share = new JobShare(1, "default", 1) };
        Assert.Equal((2, null, null), policy.Allowed("h", 2));
        state.Shares["n"] = new Grains.ShareRecord { Share = new JobShare(0, "default", 1) };
        Assert.Equal(["a", "b"], policy.Ahead("n").Order());
        Assert.Empty(policy.Ahead("h"));

        // A holder that is not a registered job (a short hold for other work) is not queued, and is never preempted.
        Assert.Equal((2, null, null), policy.Allowed("hold:export", 2));
        state.Workers["w1"].JobId = state.Workers["w3"].JobId = "hold:export";
        state.Shares["p"] = new Grains.ShareRecord { Share = new JobShare(5, "default", 2), WaitingSince = 20 };
        state.Waiting["p"] = JobWait.ToForm;
        Assert.Null(policy.Victims("p")); // the hold's two workers are not taken; a's one is not enough
        Assert.False(policy.CanForm("p"));
        state.Workers["w1"].JobId = state.Workers["w3"].JobId = null;
        state.Waiting.Remove("p");

        // A job that needs more workers than are online reserves none.
        state.Shares["a"].Share = new JobShare(0, "default", 4);
        Assert.Equal((1, null, null), policy.Allowed("b", 1));
    }

    [Fact]
    public async Task ATenantHoldsNoMoreWorkersThanItsQuotaAndTheWorkersItCannotTakeGoToOthers()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder(), options: o => o.Quotas["team-a"] = 2);
        foreach (var w in new[] { "q1", "q2", "q3", "q4" }) await c.Worker(w).RegisterAsync(TestSpecs.Worker(w), null);

        // a1 wants up to 4 but team-a may hold 2.
        await c.Job("a1").SubmitAsync(Spec(1, 5, tenant: "team-a", maxWorkers: 4));
        var a1 = await TestSpecs.EventuallyAsync(c.Job("a1").GetStatusAsync, s => s.State == JobState.Running, "a1 formed");
        Assert.Equal(2, a1.Workers.Length);
        Assert.Contains(await Registry(c).ListDecisionsAsync(), d => d.JobId == "a1" && d.Kind == "assigned" && d.Message.Contains("quota of 2"));

        // a2 of the same tenant waits although two workers are free, and says why; b1 of another tenant takes them.
        await c.Job("a2").SubmitAsync(Spec(1, 5, tenant: "team-a"));
        await TestSpecs.EventuallyAsync(c.Job("a2").GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Scheduling && e.Reason == "quota"), "a2 held by the quota");
        await c.Job("b1").SubmitAsync(Spec(2, 5, tenant: "team-b"));
        var b1 = await TestSpecs.EventuallyAsync(c.Job("b1").GetStatusAsync, s => s.State == JobState.Running, "b1 formed");
        Assert.Equal(["q3", "q4"], b1.Workers.Select(w => w.WorkerId).Order());
        Assert.Equal(JobState.Forming, (await c.Job("a2").GetStatusAsync()).State);

        // When a1 ends, team-a has room again and a2 forms.
        await c.Job("a1").StopAsync();
        await TestSpecs.EventuallyAsync(c.Job("a2").GetStatusAsync, s => s.State == JobState.Running, "a2 formed after a1 stopped");
    }

    [Fact]
    public async Task PrioritiesAndDecisionsSurviveARestartAndStillDecideAPreemption()
    {
        string folder = TestSpecs.TempFolder();
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            await c.Worker("r1").RegisterAsync(TestSpecs.Worker("r1"), null);
            await c.Job("lo").SubmitAsync(Spec(1, 5));
            await TestSpecs.EventuallyAsync(c.Job("lo").GetStatusAsync, s => s.State == JobState.Running, "lo formed");
            await c.Job("lo").ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
            // hi needs two workers; only one exists: it cannot form even by preempting, and says so.
            await c.Job("hi").SubmitAsync(Spec(2, 5, priority: 2));
            await TestSpecs.EventuallyAsync(c.Job("hi").GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Scheduling && e.Reason == "no_preemption"), "hi told why it waits");
        }
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            Assert.Contains(await Registry(c).ListDecisionsAsync(), d => d.JobId == "hi" && d.Kind == "no_preemption");
            // A second worker: with lo's, hi could form, and its priority (kept by the registry) takes lo's worker.
            await c.Worker("r2").RegisterAsync(TestSpecs.Worker("r2"), null);
            // lo's checkpoint-only generation resumes at step 0: nothing to save, so it lets its worker go at once.
            await TestSpecs.EventuallyAsync(c.Job("lo").GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Formed && e.Reason == "preemption_checkpoint"), "lo saves for the preemption");
            await c.Job("lo").ReportResumedAsync(2, new ResumedReport { Step = 0, Source = "start" });
            var hi = await TestSpecs.EventuallyAsync(c.Job("hi").GetStatusAsync, s => s.State == JobState.Running, "hi formed after the restart");
            Assert.Equal(["r1", "r2"], hi.Workers.Select(w => w.WorkerId).Order());
            Assert.Contains((await c.Job("lo").GetStatusAsync()).Events, e => e.Kind == K.Preempted && e.Reason == "preempted by hi");
        }
    }

    [Fact]
    public void PriorityAndTenantAreValidatedNamingTheField()
    {
        var problems = (Spec(1, 5) with { Priority = 1001, Tenant = "a b" }).Validate();
        Assert.Contains(problems, p => p.Field == "priority" && p.Message.Contains("between -1000 and 1000"));
        Assert.Contains(problems, p => p.Field == "tenant" && p.Message.Contains("'a b'"));
        Assert.Empty((Spec(1, 5) with { Priority = -3, Tenant = "team-a" }).Validate());

        var options = new CoordinatorOptions { Quotas = { ["team-a"] = -1 } };
        var result = Assert.Single(options.Validate(new System.ComponentModel.DataAnnotations.ValidationContext(options)));
        Assert.Contains("Coordinator:Quotas:team-a", result.ErrorMessage);
        var bound = new CoordinatorOptions { PreemptionCheckpointTimeout = TimeSpan.FromSeconds(-1) };
        Assert.Contains("Coordinator:PreemptionCheckpointTimeout must not be negative",
            Assert.Single(bound.Validate(new System.ComponentModel.DataAnnotations.ValidationContext(bound))).ErrorMessage);
    }
}
