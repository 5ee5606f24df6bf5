// parallel.redundancy in a pipelined cluster job: the real Coordinator (in this process) forms dp 2 x pp 2 with ZeRO-1 (or
// ZeRO-3, or ep 2 with ZeRO-1 or 0) on four real ClusterWorkers over tcp; each stage's two replicas shard that stage's
// optimizer state (and its parameters; or hold one expert shard each) and each keeps the other's singly held pieces. One worker leaves after a step and a spare takes its place: every stage rebuilds its state from its survivor's
// shard and copy, and the job resumes with 0 steps redone, its losses and final committed checkpoint those of the
// one-worker job bit for bit, every sample trained once.
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Parallel;
using Xunit.Abstractions;

namespace DeepSeekCluster.GpuWorker.Tests;

// In the cluster tests' collection: the bit-for-bit comparison needs the seeded weights no other test class disturbs.
[Collection(nameof(ExpertParallelClusterTests))]
public class RedundancyPipelineClusterTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 4, GlobalBatch = 8;
    DataShardsHost Data => fixture.Host;

    // Global batch 8 = 2 replicas x 2 micro-batches of 2 = 1 rank x 4: the exact gradient sums make both the same.
    // Unclipped and without MTP, as ZeroPipelineClusterTests (a stage's share of the norm is summed along the pipeline).
    JobSpec Spec(string name, ParallelPlan parallel, int workers) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = GlobalBatch, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 17, EvalInterval = 0, CheckpointInterval = 1, Parallel = parallel, MinWorkers = workers, MaxWorkers = workers,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0, MtpWeight = 0,
    };

    [Theory]
    [InlineData(1, 1)]
    [InlineData(3, 1)]
    [InlineData(1, 2)]
    [InlineData(0, 2)]
    [InlineData(3, 2)]
    public async Task ADp2Pp2ShardedJobThatLosesAWorkerResumesEachStageFromItsSurvivorsShardAndCopyWithNoStepRedoneAndCommitsTheOneWorkerJobsCheckpoint(int zero, int ep)
    {
        await using var run = await ClusterRun.StartAsync(Data, "redundancy-pp-cluster");
        var http = run.Http;
        var log = run.Log;
        try
        {
            for (int i = 0; i < 4; i++) run.StartWorker($"rpp-worker-{i}");
            await run.Online(4);

            var redundant = Spec($"pp2-ep{ep}-zero{zero}-redundant", new ParallelPlan { Dp = 2, Pp = 2, Ep = ep, Zero = zero, Redundancy = true }, 4);
            Assert.Empty(redundant.Validate());
            await ClusterJobs.Submit(http, redundant);
            // The spare waits free (the job is at maxWorkers) until a member is lost.
            run.StartWorker("rpp-worker-4");
            await run.Online(5);
            await LoseOneWorker(run, redundant.Name!, "rpp-worker-1");
            var live = await ClusterJobs.Completion(http, redundant.Name!, Steps, log);

            // ---- Every stage resharded live: 0 steps redone ----
            var liveResumes = live.Events.Where(e => e.Kind == JobEventKinds.Resumed && e.Generation > 1).ToList();
            Assert.NotEmpty(liveResumes);
            Assert.All(liveResumes, e => Assert.Equal(("shards", 0L), (e.ResumeSource, e.StepsRedone)));
            Assert.All(live.Events.Where(e => e.Kind == JobEventKinds.Formed), e => Assert.Contains("4 workers", e.Message));
            string text = log.ToString();
            foreach (int stage in new[] { 0, 1 })
                Assert.Matches($@"stage {stage} resuming at step [1-3] from the live shards of the survivors: 2 shard\(s\){(ep > 1 ? @" \(ep 2\)" : "")} resharded onto dp 2", text);
            // The lost rank's pieces came from its stage neighbour's copy: its ZeRO rows, and under ep (dp = ep in a stage:
            // each expert shard held once) its experts' rows and weights.
            Assert.Contains("'s copy)", text);
            if (zero > 0) Assert.Matches(@"\(shard \d from rank \d's copy", text);
            if (ep > 1) Assert.Matches(@"expert shard \d part 0 of 1 from rank \d's copy\)", text);
            Assert.DoesNotContain("cannot resume from live state", text);

            // ---- Each rank of each stage held its neighbour's shard from the start (in fp32 under ZeRO-3, and under ep
            // for the experts, with its parameter rows): the bytes the planner adds for redundancy ----
            var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
            var config = JobPlan.Map(redundant, (int)manifest.VocabSize, 0).Config;
            var layout = ParallelLayout.Even(2, 2, config.NumHiddenLayers).WithShards(ep, zero, config.NRoutedExperts);
            var copies = System.Text.RegularExpressions.Regex.Matches(text, @"redundancy: holds the copy of shard \d at step 0 \((\d+) bytes")
                .Select(m => long.Parse(m.Groups[1].Value)).Order().ToList();
            var inputs = new MemoryInputs("fp32", "none", 2, DataShardsHost.SeqLen);
            var predicted = Enumerable.Range(0, 4).Select(r => (Without: MemoryPlanner.Predict(config, layout, r, inputs), With: MemoryPlanner.Predict(config, layout, r, inputs with { Redundancy = true })))
                .Select(p => p.With.Optimizer + p.With.Parameters - p.Without.Optimizer - p.Without.Parameters).Order().ToList();
            Assert.Equal(4, copies.Count);
            foreach (var (bytes, expected) in copies.Zip(predicted)) Assert.InRange(bytes, expected * 0.99, expected * 1.01);

            var one = Spec($"pp2-ep{ep}-zero{zero}-reference", new ParallelPlan { Dp = 1 }, 1);
            await ClusterJobs.Submit(http, one);
            var reference = await ClusterJobs.Completion(http, one.Name!, Steps, log);

            // ---- Every sample once; the same losses; the final checkpoint bit for bit the one-worker job's ----
            foreach (var s in new[] { live, reference })
            {
                Assert.True(s.Consumption.Complete, $"{s.JobId}: the ledger is not complete: {s.Consumption}");
                Assert.Equal(((long)Steps * GlobalBatch, 0L), (s.Consumption.Samples, s.Consumption.Overlaps));
            }
            Assert.Equal(ClusterJobs.Losses(reference), ClusterJobs.Losses(live));
            var expectedTensors = await CommittedTensors.LoadWhole(Data, run.Store, one.Name!, one, Steps, run.Folder("load-one"));
            var actual = await CommittedTensors.LoadWhole(Data, run.Store, redundant.Name!, one, Steps, run.Folder("load-redundant"));
            CommittedTensors.AssertSame(expectedTensors, actual, redundant.Name!);
            output.WriteLine($"{expectedTensors.Count} tensors equal bit for bit; resumed: {string.Join(" | ", liveResumes.Select(e => e.Message))}");
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
    }

    /// <summary>
    /// Once every rank has finished step 2 (its update and its copy's refresh) and waits for step 3's samples, one worker
    /// leaves: its shard of step 2 is whole in its stage neighbour's copy, and no survivor can begin step 3's update.
    /// </summary>
    async Task LoseOneWorker(ClusterRun run, string job, string worker)
    {
        // Step 3's samples are held at the data service until the worker has been asked to leave, so however slowly this
        // test polls on a loaded machine, no rank passes the start of step 3 before the loss. A worker's heartbeat carries
        // the step it finished, set after that step's refresh (StepLoop): all four at step 2 is the state to lose from.
        // (A worker stopped in the middle of a step may take its refresh with it: then the newest step is covered nowhere.)
        Data.Calls.Hold = r => r.Split == "train" && r.Start >= 2 * GlobalBatch;
        try
        {
            await InProcessCoordinator.Until(async () =>
            {
                var s = (await run.Http.GetFromJsonAsync<JobStatus>($"/jobs/{job}", JobSpecJson.Options))!;
                Assert.NotEqual(JobState.Failed, s.State);
                Assert.True(s.Step < Steps, $"{job} finished before a worker could leave it");
                if (s.Workers.Length != 4) return false;
                var members = s.Workers.Select(w => w.WorkerId).ToHashSet();
                var workers = (await run.Http.GetFromJsonAsync<WorkerStatus[]>("/workers", JobSpecJson.Options))!;
                return workers.Count(w => members.Contains(w.WorkerId) && w.Generation == s.Generation && w.Metrics?.Step >= 2) == 4;
            }, $"every rank of {job} finishes step 2 and waits for step 3's samples", run.Log);
            await run.StopWorker(worker);
        }
        finally { Data.Calls.ReleaseAll(); }
    }
}
