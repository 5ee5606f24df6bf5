// parallel.redundancy in a cluster job: the real Coordinator (in this process) forms dp 4 with ZeRO-1 (or ZeRO-3) on four
// real ClusterWorkers over tcp; one worker leaves after a step. With redundancy every rank also holds its neighbour's
// optimizer shard (under ZeRO-3 with its parameter rows), so the three survivors reshard the live state onto dp 3 and
// resume with 0 steps redone; without it the lost shard is nowhere, and the job resumes from the committed checkpoint and says so. Either way the final committed
// checkpoint equals, bit for bit, the one an uninterrupted one-worker job commits, and every sample is trained once.
// The same for dp 4 x ep 2 x zero 1, where a spare replaces the lost worker and the lost expert rows come from a copy.
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
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"red-worker-{i}");
            await run.Online(4);

            // ---- With redundancy: a worker leaves after a step; the survivors reshard live, 0 steps redone ----
            var redundant = Spec($"zero{zero}-redundant", new ParallelPlan { Zero = zero, Redundancy = true }, 3, 4);
            Assert.Empty(redundant.Validate());
            await ClusterJobs.Submit(http, redundant);
            await LoseOneWorker(run, redundant.Name!, "red-worker-1", afterCommit: false);
            var live = await ClusterJobs.Completion(http, redundant.Name!, Steps, log);
            var liveResumes = live.Events.Where(e => e.Kind == JobEventKinds.Resumed && e.Generation > 1).ToList();
            Assert.NotEmpty(liveResumes);
            Assert.All(liveResumes, e => Assert.Equal(("shards", 0L), (e.ResumeSource, e.StepsRedone)));
            Assert.All(liveResumes, e => Assert.Contains("from the live ZeRO shards of the survivors", e.Message));
            Assert.Contains(live.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("3 workers"));
            Assert.Contains("from the live shards of the survivors: 4 shard(s) resharded onto dp 3", log.ToString());
            Assert.Contains("'s copy)", log.ToString()); // the lost rank's shard came from its neighbour's copy
            // Each rank of dp 4 held its neighbour's shard from the start: the bytes the planner adds for it (within a row's
            // rounding); under ZeRO-3 in fp32 the neighbour's parameter rows besides its moments.
            var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
            var config = JobPlan.Map(redundant, (int)manifest.VocabSize, 0).Config;
            var layout = ParallelLayout.Even(4, 1, config.NumHiddenLayers).WithShards(1, zero, config.NRoutedExperts);
            var copies = System.Text.RegularExpressions.Regex.Matches(log.ToString(), @"redundancy: holds the copy of shard (\d) at step 0 \((\d+) bytes")
                .Select(m => (Shard: int.Parse(m.Groups[1].Value), Bytes: long.Parse(m.Groups[2].Value))).ToList();
            Assert.Equal([0, 1, 2, 3], copies.Select(c => c.Shard).Order());
            foreach (var (shard, bytes) in copies)
            {
                var neighbour = MemoryPlanner.Predict(config, layout, shard, new MemoryInputs("fp32", "none", 1, DataShardsHost.SeqLen));
                long predicted = neighbour.Optimizer + (zero >= 3 ? neighbour.Parameters : 0);
                Assert.InRange(bytes, predicted * 0.99, predicted * 1.01);
            }

            // ---- Without: the same loss resumes from the committed checkpoint, and says so ----
            run.StartWorker("red-worker-4");
            await run.Online(4); // red-worker-1 left: 0, 2, 3 and 4
            var plain = Spec($"zero{zero}-plain", new ParallelPlan { Zero = zero }, 3, 4);
            await ClusterJobs.Submit(http, plain);
            await LoseOneWorker(run, plain.Name!, "red-worker-4", afterCommit: true);
            var reloaded = await ClusterJobs.Completion(http, plain.Name!, Steps, log);
            var last = reloaded.Events.Last(e => e.Kind == JobEventKinds.Resumed);
            Assert.True(last.Generation > 1, "the job without redundancy did not re-form");
            Assert.Equal("checkpoint", last.ResumeSource);
            Assert.Contains("from the committed checkpoint of step", last.Message);

            var one = Spec($"zero{zero}-reference", new ParallelPlan { Dp = 1 }, 1, 1);
            await ClusterJobs.Submit(http, one);
            var reference = await ClusterJobs.Completion(http, one.Name!, Steps, log);

            // ---- Every sample once; the same losses; the final checkpoints bit for bit the one-worker job's ----
            foreach (var s in new[] { live, reloaded, reference })
            {
                Assert.True(s.Consumption.Complete, $"{s.JobId}: the ledger is not complete: {s.Consumption}");
                Assert.Equal(((long)Steps * GlobalBatch, 0L), (s.Consumption.Samples, s.Consumption.Overlaps));
            }
            Assert.Equal(ClusterJobs.Losses(reference), ClusterJobs.Losses(live));
            Assert.Equal(ClusterJobs.Losses(reference), ClusterJobs.Losses(reloaded));
            var expected = await CommittedTensors.LoadWhole(Data, run.Store, one.Name!, one, Steps, run.Folder("load-one"));
            Assert.Contains(expected.Keys, k => k.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
            foreach (var job in new[] { redundant.Name!, plain.Name! })
            {
                var actual = await CommittedTensors.LoadWhole(Data, run.Store, job, one, Steps, run.Folder($"load-{job}"));
                CommittedTensors.AssertSame(expected, actual, job);
            }
            output.WriteLine($"{expected.Count} tensors equal bit for bit; resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))} / {last.Message}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
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
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"rep-worker-{i}");
            await run.Online(4);

            // ---- With redundancy: a worker leaves after a step; the three survivors and a spare reshard live ----
            var redundant = Spec($"ep2-zero{zero}-redundant", new ParallelPlan { Ep = 2, Zero = zero, Redundancy = true }, 2, 4);
            Assert.Empty(redundant.Validate());
            await ClusterJobs.Submit(http, redundant);
            // The spare waits free (the job is at maxWorkers) until a member is lost: dp 4 again, not dp 2 of three survivors.
            run.StartWorker("rep-worker-4");
            await run.Online(5);
            await LoseOneWorker(run, redundant.Name!, "rep-worker-1", afterCommit: false);
            var live = await ClusterJobs.Completion(http, redundant.Name!, Steps, log);
            var liveResumes = live.Events.Where(e => e.Kind == JobEventKinds.Resumed && e.Generation > 1).ToList();
            Assert.NotEmpty(liveResumes);
            Assert.All(liveResumes, e => Assert.Equal(("shards", 0L), (e.ResumeSource, e.StepsRedone)));
            Assert.All(live.Events.Where(e => e.Kind == JobEventKinds.Formed), e => Assert.Contains("4 workers", e.Message));
            Assert.Contains("from the live shards of the survivors: 4 shard(s) (ep 2) resharded onto dp 4", log.ToString());
            var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
            var config = JobPlan.Map(redundant, (int)manifest.VocabSize, 0).Config;
            var layout = ParallelLayout.Even(4, 1, config.NumHiddenLayers).WithShards(2, zero, config.NRoutedExperts);
            if (zero == 0)
            {
                // Every piece has two holders: no copy is kept, and each comes from a survivor holding it.
                Assert.Equal((0L, 0L), MemoryPlanner.NeighbourElements(config, layout, 0));
                Assert.DoesNotContain("redundancy: holds the copy", log.ToString());
                Assert.DoesNotContain("'s copy", log.ToString());
            }
            else
                // The lost rank's replicated rows and its part of its expert shard's rows came from its neighbour's copy.
                Assert.Matches(@"\(shard \d from rank \d's copy, expert shard \d part \d of 2 from rank \d's copy\)", log.ToString());
            // Each rank held its neighbour's pieces from the start: the bytes the planner adds for redundancy.
            var copies = System.Text.RegularExpressions.Regex.Matches(log.ToString(), @"redundancy: holds the copy of shard (\d) at step 0 \((\d+) bytes")
                .Select(m => (Shard: int.Parse(m.Groups[1].Value), Bytes: long.Parse(m.Groups[2].Value))).ToList();
            Assert.Equal(zero == 0 ? [] : [0, 1, 2, 3], copies.Select(c => c.Shard).Order());
            foreach (var (shard, bytes) in copies)
            {
                var inputs = new MemoryInputs("fp32", "none", 1, DataShardsHost.SeqLen);
                int holder = (shard + 3) % 4;
                var (without, with) = (MemoryPlanner.Predict(config, layout, holder, inputs), MemoryPlanner.Predict(config, layout, holder, inputs with { Redundancy = true }));
                long predicted = with.Optimizer + with.Parameters - without.Optimizer - without.Parameters;
                Assert.InRange(bytes, predicted * 0.99, predicted * 1.01);
            }

            // ---- Without (zero 1): the same loss resumes from the committed checkpoint (dp 2 of the three survivors), and
            // says so. (At zero 0 two survivors that keep their expert shards may go on live: no shard is held once.)
            var jobs = new List<(string Name, JobStatus Status)> { (redundant.Name!, live) };
            string? last = null;
            if (zero > 0)
            {
                var plain = Spec($"ep2-zero{zero}-plain", new ParallelPlan { Ep = 2, Zero = zero }, 2, 4);
                await ClusterJobs.Submit(http, plain);
                await LoseOneWorker(run, plain.Name!, "rep-worker-4", afterCommit: true);
                var reloaded = await ClusterJobs.Completion(http, plain.Name!, Steps, log);
                var resumed = reloaded.Events.Last(e => e.Kind == JobEventKinds.Resumed);
                Assert.True(resumed.Generation > 1, "the job without redundancy did not re-form");
                Assert.Equal("checkpoint", resumed.ResumeSource);
                Assert.Contains("from the committed checkpoint of step", resumed.Message);
                jobs.Add((plain.Name!, reloaded));
                last = resumed.Message;
            }

            var one = Spec($"ep2-zero{zero}-reference", new ParallelPlan { Dp = 1 }, 1, 1);
            await ClusterJobs.Submit(http, one);
            var reference = await ClusterJobs.Completion(http, one.Name!, Steps, log);

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
            output.WriteLine($"{expected.Count} tensors equal bit for bit; resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))} / {last ?? "-"}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }

    /// <summary>
    /// Once the job has trained a step on four workers (and, <paramref name="afterCommit"/>, committed a checkpoint), one
    /// worker leaves: it finishes the step in flight, so its rank's shard is whole in the survivors' copies or nowhere.
    /// </summary>
    async Task LoseOneWorker(ClusterRun run, string job, string worker, bool afterCommit)
    {
        // Step 3's samples are held at the data service until the worker has been asked to leave, so however slowly this
        // test polls on a loaded machine, the job cannot finish (or even pass step 3) before the loss.
        Data.Calls.Hold = r => r.Split == "train" && r.Start >= 2 * GlobalBatch;
        try
        {
            await InProcessCoordinator.Until(async () =>
            {
                var s = (await run.Http.GetFromJsonAsync<JobStatus>($"/jobs/{job}", JobSpecJson.Options))!;
                Assert.NotEqual(JobState.Failed, s.State);
                Assert.True(s.Step < Steps, $"{job} finished before a worker could leave it");
                return s.Workers.Length == 4 && s.Step >= 1 && (!afterCommit || s.Committed.Length > 0);
            }, $"{job} trains a step on four workers", run.Log);
            await run.StopWorker(worker);
        }
        finally { Data.Calls.ReleaseAll(); }
    }
}
