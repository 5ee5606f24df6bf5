// parallel.redundancy in a cluster job: the real Coordinator (in this process) forms dp 4 with ZeRO-1 (or ZeRO-3) on four
// real ClusterWorkers over tcp; one worker leaves after a step. With redundancy every rank also holds its neighbour's
// optimizer shard (under ZeRO-3 with its parameter rows), so the three survivors reshard the live state onto dp 3 and
// resume with 0 steps redone; without it the lost shard is nowhere, and the job resumes from the committed checkpoint and says so. Either way the final committed
// checkpoint equals, bit for bit, the one an uninterrupted one-worker job commits, and every sample is trained once.
// The same for dp 4 x ep 2 x zero 1, where a spare replaces the lost worker and the lost expert rows come from a copy,
// and for dp 4 x ep 2 x zero 1 shrinking to dp 2 without a spare, where the Coordinator keeps the two survivors that
// hold every piece between them (the first two by rank do not).
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Parallel;
using Xunit.Abstractions;

namespace DeepSeekCluster.GpuWorker.Tests;

// In the cluster tests' collection: the bit-for-bit comparison needs the seeded weights no other test class disturbs.
[Collection(nameof(ExpertParallelClusterTests))]
public class RedundancyClusterTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 5, GlobalBatch = 12;
    DataShardsHost Data => fixture.Host;

    // Global batch 12 = 4 ranks x 3 micro-batches of 1 = 3 ranks x 4 = 1 rank x 12: the exact gradient sums make all the same.
    JobSpec Spec(string name, ParallelPlan parallel, int min, int max) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = GlobalBatch, MicroBatch = 1, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 13, EvalInterval = 0, CheckpointInterval = 1, Parallel = parallel, MinWorkers = min, MaxWorkers = max,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0.5,
    };

    [Fact]
    public Task AZero1JobThatLosesAWorkerResumesLiveWithRedundancyAndFromTheCheckpointWithoutAndBothCommitTheOneWorkerJobsCheckpoint() => LoseAWorker(1);

    [Fact]
    public Task AZero3JobThatLosesAWorkerResumesLiveFromTheNeighboursParameterRowsWithRedundancyAndFromTheCheckpointWithoutAndBothCommitTheOneWorkerJobsCheckpoint() => LoseAWorker(3);

    async Task LoseAWorker(int zero)
    {
        await using var run = await ClusterRun.StartAsync(Data, "redundancy-cluster");
        await Guarded(run, async () =>
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"red-worker-{i}");
            await run.Online(4);

            // ---- With redundancy: a worker leaves after a step; the survivors reshard live onto dp 3, 0 steps redone ----
            var redundant = Spec($"zero{zero}-redundant", new ParallelPlan { Zero = zero, Redundancy = true }, 3, 4);
            var (live, liveResumes) = await LoseLive(run, redundant, "red-worker-1");
            Assert.All(liveResumes, e => Assert.Contains("from the live ZeRO shards of the survivors", e.Message));
            Assert.Contains(live.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("3 workers"));
            Assert.Contains("from the live shards of the survivors: 4 shard(s) resharded onto dp 3", run.Log.ToString());
            Assert.Contains("'s copy)", run.Log.ToString()); // the lost rank's shard came from its neighbour's copy
            // Each rank of dp 4 held its neighbour's shard from the start (under ZeRO-3 in fp32 its parameter rows too).
            AssertCopiesArePlanned(run, redundant, zero, ep: 1);

            // ---- Without: the same loss resumes from the committed checkpoint, and says so ----
            run.StartWorker("red-worker-4");
            await run.Online(4); // red-worker-1 left: 0, 2, 3 and 4
            var plain = Spec($"zero{zero}-plain", new ParallelPlan { Zero = zero }, 3, 4);
            var (reloaded, last) = await LoseToCheckpoint(run, plain, "red-worker-4");

            await AssertOneWorkerJobsCheckpoint(run, $"zero{zero}", [(redundant.Name!, live), (plain.Name!, reloaded)]);
            output.WriteLine($"resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))} / {last}");
        });
    }

    /// <summary>
    /// ep 2 x zero 1 on dp 4: each expert shard's optimizer rows are split over its two holders, so every rank's part of
    /// them, like its replicated ZeRO rows, is held once and its ring neighbour keeps a copy (with the experts' weights).
    /// At zero 0 every expert shard has two holders and nothing is copied. A worker leaves after a step and a spare takes
    /// its place: the survivors and the spare (which holds nothing, and ranks move to other expert shards) reshard the
    /// live state onto dp 4 x ep 2 with 0 steps redone. Without redundancy the same loss resumes from the committed
    /// checkpoint. Both commit the one-worker job's checkpoint bit for bit.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(0)]
    [InlineData(3)] // ZeRO-3: the copies hold the neighbour's replicated and expert parameter rows too
    public async Task AnEp2JobThatLosesAWorkerResumesLiveFromTheExpertShardsAndTheirCopiesWithRedundancyAndFromTheCheckpointWithoutAndBothCommitTheOneWorkerJobsCheckpoint(int zero)
    {
        await using var run = await ClusterRun.StartAsync(Data, "redundancy-ep-cluster");
        await Guarded(run, async () =>
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"rep-worker-{i}");
            await run.Online(4);

            // ---- With redundancy: a worker leaves after a step; the three survivors and a spare reshard live ----
            var redundant = Spec($"ep2-zero{zero}-redundant", new ParallelPlan { Ep = 2, Zero = zero, Redundancy = true }, 2, 4);
            // The spare waits free (the job is at maxWorkers) until a member is lost: dp 4 again, not dp 2 of three survivors.
            var (live, liveResumes) = await LoseLive(run, redundant, "rep-worker-1", spare: "rep-worker-4");
            Assert.All(live.Events.Where(e => e.Kind == JobEventKinds.Formed), e => Assert.Contains("4 workers", e.Message));
            Assert.Contains("from the live shards of the survivors: 4 shard(s) (ep 2) resharded onto dp 4", run.Log.ToString());
            Assert.All(liveResumes, e => Assert.Contains(zero == 0 ? "from the live expert shards of the survivors" : "from the live ZeRO and expert shards of the survivors", e.Message));
            if (zero == 0)
            {
                // Every piece has two holders: no copy is kept, and each comes from a survivor holding it.
                Assert.DoesNotContain("redundancy: holds the copy", run.Log.ToString());
                Assert.DoesNotContain("'s copy", run.Log.ToString());
            }
            else
                // The lost rank's replicated rows and its part of its expert shard's rows came from its neighbour's copy.
                Assert.Matches(@"\(shard \d from rank \d's copy, expert shard \d part \d of 2 from rank \d's copy\)", run.Log.ToString());
            AssertCopiesArePlanned(run, redundant, zero, ep: 2);

            // ---- Without (zero 1): the same loss resumes from the committed checkpoint (dp 2 of the three survivors), and
            // says so. (At zero 0 two survivors that keep their expert shards may go on live: no shard is held once.)
            var jobs = new List<(string Name, JobStatus Status)> { (redundant.Name!, live) };
            string? last = null;
            if (zero > 0)
            {
                var plain = Spec($"ep2-zero{zero}-plain", new ParallelPlan { Ep = 2, Zero = zero }, 2, 4);
                var (reloaded, message) = await LoseToCheckpoint(run, plain, "rep-worker-4");
                jobs.Add((plain.Name!, reloaded));
                last = message;
            }

            await AssertOneWorkerJobsCheckpoint(run, $"ep2-zero{zero}", jobs);
            output.WriteLine($"resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))} / {last ?? "-"}");
        });
    }

    /// <summary>
    /// dp 4 x ep 2 x zero 1 with redundancy and no spare loses rank 2: three survivors, so dp 2 (ep 2 divides no 3). Rank 2
    /// kept rank 3's copy, so the first two survivors by rank (0 and 1) would leave rank 3's ZeRO rows and its part of
    /// expert shard 1 nowhere and the job would load the checkpoint. The Coordinator keeps ranks 1 and 3 (rank 1 holds
    /// rank 2's copy, rank 3 rank 0's): they reshard every piece live (rank 1 moves to expert shard 0) with 0 steps
    /// redone, and the job commits the one-worker job's checkpoint bit for bit.
    /// </summary>
    [Fact]
    public async Task AnEp2Zero1JobThatShrinksWithoutASpareKeepsTheSurvivorsHoldingEveryPieceAndResumesLiveWithNoStepRedone()
    {
        await using var run = await ClusterRun.StartAsync(Data, "redundancy-members");
        await Guarded(run, async () =>
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"mem-worker-{i}");
            await run.Online(4);
            var redundant = Spec("ep2-shrink-redundant", new ParallelPlan { Ep = 2, Zero = 1, Redundancy = true }, 2, 4);
            // Ranks follow the order the workers were claimed in: the worker that leaves is the one holding rank 2.
            var (live, liveResumes) = await LoseLive(run, redundant, rank: 2);
            var formed = live.Events.Where(e => e.Kind == JobEventKinds.Formed).ToList();
            var shrunk = Assert.Single(formed, e => e.Message.Contains("2 workers"));
            Assert.Contains("kept the survivors whose live state holds every piece of the dp 4 layout, not the first by rank", shrunk.Message);
            Assert.Contains("from the live shards of the survivors: 4 shard(s) (ep 2) resharded onto dp 2", run.Log.ToString());
            Assert.All(liveResumes, e => Assert.Contains("from the live ZeRO and expert shards of the survivors", e.Message));
            await AssertOneWorkerJobsCheckpoint(run, "ep2-shrink", [(redundant.Name!, live)]);
            output.WriteLine($"{shrunk.Message}; resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))}");
        });
    }

    /// <summary>
    /// dp 4 x zero 1 with redundancy: worker 2 loses its ring as step 3's update begins (FaultInjection's updateloss), so
    /// ranks 0, 1 and 3 apply step 3's update to their shards and are caught in the all-gather of the updated rows. Each
    /// rank marked its live state not held as its update began (ITrainer.BeforeStateChange, StateChange.Update), so no rank holds one and the job
    /// resumes from the committed checkpoint (or the start), and says so; had the others kept step 2's label on rows and
    /// moments of step 3, the live reshard would have resumed from them and redone step 3 on top (the final checkpoint
    /// would differ from the one-worker job's, which it equals bit for bit).
    /// </summary>
    [Fact]
    public async Task ARingLostAsAZero1UpdateBeginsLeavesNoRankHoldingALiveStateAndTheJobResumesFromTheCheckpointEqualToTheOneWorkerJob()
    {
        await using var run = await ClusterRun.StartAsync(Data, "redundancy-update-loss");
        await Guarded(run, async () =>
        {
            var faults = FaultInjection.Parse("updateloss@3:upd-worker-2", "the test's faults");
            for (int i = 0; i < 4; i++) run.StartWorker($"upd-worker-{i}", s => s with { Faults = faults });
            await run.Online(4);
            var spec = Spec("zero1-update-loss", new ParallelPlan { Zero = 1, Redundancy = true }, 4, 4);
            await ClusterJobs.Submit(run.Http, spec);
            var status = await ClusterJobs.Completion(run.Http, spec.Name!, Steps, run.Log);
            Assert.Contains("injected fault: worker upd-worker-2 loses its ring as step 3's update begins", run.Log.ToString());
            var resumed = status.Events.Last(e => e.Kind == JobEventKinds.Resumed);
            Assert.True(resumed.Generation > 1, "the job did not re-form after the ring was lost");
            // Every rank that reached its update holds nothing. (One that the re-formation's abort caught before it, stalled
            // past the grace on a loaded machine, still holds step 2, and a live resume from such ranks is as exact.)
            Assert.Matches("from (the committed checkpoint of step [12]|the start|the live ZeRO shards of the survivors)", resumed.Message);
            await AssertOneWorkerJobsCheckpoint(run, "zero1-update-loss", [(spec.Name!, status)]);
            output.WriteLine(resumed.Message);
        });
    }

    /// <summary>Runs <paramref name="body"/>, printing every worker's log when it fails.</summary>
    async Task Guarded(ClusterRun run, Func<Task> body)
    {
        try { await body(); }
        catch
        {
            output.WriteLine(run.Log.ToString());
            throw;
        }
    }

    /// <summary>
    /// Submits <paramref name="spec"/> (with redundancy), makes a member leave after a step (<paramref name="worker"/>, or
    /// whichever holds <paramref name="rank"/>; <paramref name="spare"/> started once the job formed, to wait free until
    /// then), and waits for it to complete: every later generation resumed from the live shards with 0 steps redone.
    /// </summary>
    async Task<(JobStatus Status, List<JobEvent> Resumes)> LoseLive(ClusterRun run, JobSpec spec, string? worker = null, string? spare = null, int rank = -1)
    {
        Assert.Empty(spec.Validate());
        await ClusterJobs.Submit(run.Http, spec);
        if (spare is not null)
        {
            run.StartWorker(spare);
            await run.Online(5);
        }
        await LoseOneWorker(run, spec.Name!, worker, rank, afterCommit: false);
        var status = await ClusterJobs.Completion(run.Http, spec.Name!, Steps, run.Log);
        var resumes = status.Events.Where(e => e.Kind == JobEventKinds.Resumed && e.Generation > 1).ToList();
        Assert.NotEmpty(resumes);
        Assert.All(resumes, e => Assert.Equal(("shards", 0L), (e.ResumeSource, e.StepsRedone)));
        return (status, resumes);
    }

    /// <summary>Submits <paramref name="spec"/> (without redundancy), makes <paramref name="worker"/> leave after a commit, and waits for it to complete: it resumed from the checkpoint and said so.</summary>
    async Task<(JobStatus Status, string Message)> LoseToCheckpoint(ClusterRun run, JobSpec spec, string worker)
    {
        await ClusterJobs.Submit(run.Http, spec);
        await LoseOneWorker(run, spec.Name!, worker, -1, afterCommit: true);
        var status = await ClusterJobs.Completion(run.Http, spec.Name!, Steps, run.Log);
        var resumed = status.Events.Last(e => e.Kind == JobEventKinds.Resumed);
        Assert.True(resumed.Generation > 1, $"{spec.Name} without redundancy did not re-form");
        Assert.Equal("checkpoint", resumed.ResumeSource);
        Assert.Contains("from the committed checkpoint of step", resumed.Message);
        return (status, resumed.Message);
    }

    /// <summary>
    /// Each rank held its ring neighbour's pieces from the start (at step 0): the bytes the planner adds for redundancy to
    /// the rank holding the copy (within a row's rounding); at ep 2 x zero 0 every piece has two holders and none is kept.
    /// </summary>
    void AssertCopiesArePlanned(ClusterRun run, JobSpec spec, int zero, int ep)
    {
        var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
        var config = JobPlan.Map(spec, (int)manifest.VocabSize, 0).Config;
        var layout = ParallelLayout.Even(4, 1, config.NumHiddenLayers).WithShards(ep, zero, config.NRoutedExperts);
        var copies = System.Text.RegularExpressions.Regex.Matches(run.Log.ToString(), @"redundancy: holds the copy of shard (\d) at step 0 \((\d+) bytes")
            .Select(m => (Shard: int.Parse(m.Groups[1].Value), Bytes: long.Parse(m.Groups[2].Value))).ToList();
        if (zero == 0 && ep > 1) Assert.Equal((0L, 0L), MemoryPlanner.NeighbourElements(config, layout, 0));
        Assert.Equal(zero == 0 ? [] : [0, 1, 2, 3], copies.Select(c => c.Shard).Order());
        foreach (var (shard, bytes) in copies)
        {
            var inputs = new MemoryInputs("fp32", "none", 1, DataShardsHost.SeqLen);
            int holder = (shard + 3) % 4;
            var (without, with) = (MemoryPlanner.Predict(config, layout, holder, inputs), MemoryPlanner.Predict(config, layout, holder, inputs with { Redundancy = true }));
            long predicted = with.Optimizer + with.Parameters - without.Optimizer - without.Parameters;
            Assert.InRange(bytes, predicted * 0.99, predicted * 1.01);
        }
    }

    /// <summary>
    /// The one-worker job of the same spec (named <paramref name="prefix"/>-reference) against <paramref name="jobs"/>:
    /// every sample trained once in each, the same losses, and each final committed checkpoint equal to its bit for bit.
    /// </summary>
    async Task AssertOneWorkerJobsCheckpoint(ClusterRun run, string prefix, IReadOnlyList<(string Name, JobStatus Status)> jobs)
    {
        var one = Spec($"{prefix}-reference", new ParallelPlan { Dp = 1 }, 1, 1);
        await ClusterJobs.Submit(run.Http, one);
        var reference = await ClusterJobs.Completion(run.Http, one.Name!, Steps, run.Log);
        foreach (var s in jobs.Select(j => j.Status).Append(reference))
        {
            Assert.True(s.Consumption.Complete, $"{s.JobId}: the ledger is not complete: {s.Consumption}");
            Assert.Equal(((long)Steps * GlobalBatch, 0L), (s.Consumption.Samples, s.Consumption.Overlaps));
        }
        var expected = await CommittedTensors.LoadWhole(Data, run.Store, one.Name!, one, Steps, run.Folder("load-one"));
        Assert.Contains(expected.Keys, k => k.Contains(".mlp.experts.7.", StringComparison.Ordinal) && k.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
        foreach (var (job, status) in jobs)
        {
            Assert.Equal(ClusterJobs.Losses(reference), ClusterJobs.Losses(status));
            var actual = await CommittedTensors.LoadWhole(Data, run.Store, job, one, Steps, run.Folder($"load-{job}"));
            CommittedTensors.AssertSame(expected, actual, job);
        }
        output.WriteLine($"{expected.Count} tensors equal bit for bit in {string.Join(", ", jobs.Select(j => j.Name))}");
    }

    /// <summary>
    /// Once every rank of the job's four has finished step 2 (its update and its copy's refresh) and waits for step 3's
    /// samples (and, <paramref name="afterCommit"/>, a checkpoint is committed), one worker leaves (<paramref name="worker"/>,
    /// or the one holding <paramref name="rank"/>): its rank's shard of step 2 is whole in the survivors' copies or nowhere.
    /// </summary>
    async Task LoseOneWorker(ClusterRun run, string job, string? worker, int rank, bool afterCommit)
    {
        // Step 3's samples are held at the data service until the worker has been asked to leave, so however slowly this
        // test polls on a loaded machine, the job cannot finish (or even pass step 3) before the loss. A worker's heartbeat
        // carries the step it finished, set after that step's refresh (StepLoop): all four at step 2 is the state to lose
        // from. (A worker stopped in the middle of step 2 may take its refresh with it: then step 2 is covered nowhere and
        // the job resumes from the checkpoint, which CI saw once.)
        Data.Calls.Hold = r => r.Split == "train" && r.Start >= 2 * GlobalBatch;
        try
        {
            JobStatus? formed = null;
            await InProcessCoordinator.Until(async () =>
            {
                var s = (await run.Http.GetFromJsonAsync<JobStatus>($"/jobs/{job}", JobSpecJson.Options))!;
                Assert.NotEqual(JobState.Failed, s.State);
                Assert.True(s.Step < Steps, $"{job} finished before a worker could leave it");
                formed = s;
                if (s.Workers.Length != 4 || afterCommit && s.Committed.Length == 0) return false;
                var members = s.Workers.Select(w => w.WorkerId).ToHashSet();
                var workers = (await run.Http.GetFromJsonAsync<WorkerStatus[]>("/workers", JobSpecJson.Options))!;
                return workers.Count(w => members.Contains(w.WorkerId) && w.Generation == s.Generation && w.Metrics?.Step >= 2) == 4;
            }, $"every rank of {job} finishes step 2 and waits for step 3's samples", run.Log);
            await run.StopWorker(worker ?? formed!.Workers.Single(w => w.Rank == rank).WorkerId);
        }
        finally { Data.Calls.ReleaseAll(); }
    }
}
