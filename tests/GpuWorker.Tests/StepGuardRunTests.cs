// The step guard on a whole run of one rank against the real DataShards and CheckpointStore services: an injected NaN
// step is skipped, an injected loss spike rolls the live state back to the last snapshot, each is reported with its
// reason, and the step reports still claim every sample exactly once (the ledger the Coordinator builds from them).
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using StepGuardSpec = DeepSeekCluster.Contracts.Grains.StepGuardSpec;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;

namespace DeepSeekCluster.GpuWorker.Tests;

public class StepGuardRunTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    DataShardsHost Data => fixture.Host;

    [Fact]
    public async Task AnInjectedNaNIsSkippedAndAnInjectedSpikeRollsBackWithEverySampleClaimedOnce()
    {
        const int globalBatch = 4, steps = 9;
        await using var store = await StoreHost.StartAsync();
        var spec = new JobSpec
        {
            Name = "guarded", ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = globalBatch, MicroBatch = 2,
            SeqLen = DataShardsHost.SeqLen, Steps = steps, Schedule = new() { Kind = "constant", WarmupSteps = 1 },
            Guard = new StepGuardSpec { Window = 8, MinHistory = 3, SnapshotEvery = 2, LrFactor = 0.5, MaxRollbacks = 1, Warmup = 0 },
        };
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = "guarded", Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = Directory.CreateTempSubdirectory("run-guard-").FullName,
            Faults = FaultInjection.Parse("nan@3,spike@7", "the test's faults"),
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));

        string output = log.ToString();
        List<StepReport> reports;
        List<GuardAction> guard;
        lock (sent)
        {
            Assert.DoesNotContain(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Leaving);
            reports = [.. sent.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.SampleCount > 0).Select(m => m.Step)];
            guard = [.. sent.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Guard).Select(m => m.Guard)];
        }
        // Step 3 (NaN) not applied; step 7 (every weight matrix drowned in noise) rolled back to the snapshot of step 6.
        Assert.Equal(["skipped", "rolled_back"], guard.Select(g => g.Action));
        Assert.Equal(3, guard[0].Step);
        Assert.Contains("not finite", guard[0].Reason);
        var rollback = guard[1];
        Assert.Equal((7L, 6L, (long)globalBatch, 0.5, 1), (rollback.Step, rollback.RestoredStep, rollback.SamplesSkipped, rollback.LrScale, rollback.Rollbacks));
        Assert.Contains("robust deviations above the median", rollback.Reason);
        // The run went on from the restored state at half the learning rate, with losses back in the range before the spike.
        var byStep = reports.ToDictionary(r => r.Step);
        Assert.True(byStep[7].Loss > 2 * byStep[6].Loss, $"the injected spike did not show: {byStep[6].Loss} -> {byStep[7].Loss}\n{output}");
        Assert.True(byStep[8].Loss < byStep[6].Loss + 0.5, $"step 8 did not continue from step 6's state: {byStep[6].Loss} -> {byStep[8].Loss}\n{output}");
        Assert.Equal(byStep[6].LearningRate * 0.5, byStep[8].LearningRate);

        // Exactly once: one report per step, their samples back to back from 0 to steps × global batch.
        Assert.Equal(Enumerable.Range(1, steps).Select(s => (long)s), reports.Select(r => r.Step));
        long next = 0;
        foreach (var r in reports) { Assert.Equal(next, r.SampleStart); next += r.SampleCount; }
        Assert.Equal((long)steps * globalBatch, next);
        Directory.Delete(settings.OutputDir, recursive: true);
    }

    /// <summary>One generation of rank 0 of 1 with <paramref name="faults"/>, on <paramref name="holder"/>'s live state.</summary>
    async Task<(List<WorkerMessage> Sent, string Log)> RunAsync(JobSpec spec, long generation, long resumeStep, string faults, ReplicaHolder holder,
                                                               StoreHost store, string outputDir)
    {
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = spec.Name!, Generation = generation, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1, ResumeStep = resumeStep,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = outputDir, Faults = FaultInjection.Parse(faults, "the test's faults"),
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log, replica: holder);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        lock (sent) return ([.. sent], log.ToString());
    }

    static List<T> Of<T>(IEnumerable<WorkerMessage> sent, WorkerMessage.KindOneofCase kind, Func<WorkerMessage, T> pick) =>
        [.. sent.Where(m => m.KindCase == kind).Select(pick)];

    /// <summary>
    /// The guard's defaults (rollback on, window 50, minHistory 10, threshold 10, snapshots every 10 steps), the warm-up
    /// shortened from 50 to 10 steps to keep the run short: a normal tiny-preset run judges its steps after the warm-up and
    /// rolls nothing back; an injected spike rolls back exactly once; and a job resumed from a committed checkpoint carries
    /// the rule's window: without it, the resumed rule would know 4 steps at the spike, fewer than minHistory, and apply it.
    /// </summary>
    [Fact]
    public async Task WithTheDefaultGuardANormalRunRollsNothingBackASpikeRollsBackOnceAndTheWindowSurvivesACheckpointResume()
    {
        const int globalBatch = 4, steps = 24, committed = 18, spikeAt = 22;
        await using var store = await StoreHost.StartAsync();
        string output = Directory.CreateTempSubdirectory("run-guard-default-").FullName;
        var spec = new JobSpec
        {
            Name = "guard-default", ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = globalBatch, MicroBatch = 2,
            SeqLen = DataShardsHost.SeqLen, Steps = steps, Schedule = new() { Kind = "constant", WarmupSteps = 1 }, CheckpointInterval = 9,
            Guard = new StepGuardSpec { Warmup = 10 },
        };
        Assert.Equal(new StepGuardSpec() with { Warmup = 10 }, spec.Guard);
        Assert.True(spec.Guard.Rollback);

        // The uninterrupted run, its weights from the seed, the spike injected at step 22.
        var reference = new ReplicaHolder();
        var (sent, log) = await RunAsync(spec, 1, 0, $"spike@{spikeAt}", reference, store, output);
        var guard = Of(sent, WorkerMessage.KindOneofCase.Guard, m => m.Guard);
        var rollback = Assert.Single(guard);
        Assert.True(("rolled_back", (long)spikeAt, 20L) == (rollback.Action, rollback.Step, rollback.RestoredStep), $"{rollback}\n{log}");
        Assert.Contains("robust deviations above the median", rollback.Reason);
        Assert.Contains("of the last 11 good steps", rollback.Reason); // steps 11..21: the warm-up's 10 steps are not in the window
        var reports = Of(sent, WorkerMessage.KindOneofCase.Step, m => m.Step).Where(r => r.SampleCount > 0).ToList();
        Assert.Equal(Enumerable.Range(1, steps).Select(s => ((long)s, (long)(s - 1) * globalBatch, globalBatch)), reports.Select(r => (r.Step, r.SampleStart, r.SampleCount)));
        var referenceGuard = reference.State!.Guard!;
        Assert.Equal(((long)steps, 1, 13), (referenceGuard.Step, referenceGuard.Rollbacks, referenceGuard.Losses.Length));

        // The checkpoint of step 18 carries the rule's state: commit it as the Coordinator would.
        var saved = Of(sent, WorkerMessage.KindOneofCase.Checkpoint, m => m.Checkpoint).Single(c => c.Step == committed);
        var commit = new CommitCheckpointRequest { Job = spec.Name, Step = committed, Generation = 1, ManifestJson = saved.ManifestJson };
        commit.Files.Add(new ExpectedFile { FileName = saved.File, Size = saved.SizeBytes, Sha256 = saved.Sha256 });
        await store.Client.CommitCheckpointAsync(commit);

        // A fresh worker resumes there (no live state anywhere): the same spike, the same verdict, the same state at the end.
        var resumedHolder = new ReplicaHolder();
        var (resumedSent, resumedLog) = await RunAsync(spec, 2, committed, $"spike@{spikeAt}", resumedHolder, store, output);
        var resumed = Assert.Single(resumedSent, m => m.KindCase == WorkerMessage.KindOneofCase.Resumed).Resumed;
        Assert.True(((long)committed, "checkpoint") == (resumed.Step, resumed.Source), resumedLog);
        var resumedRollback = Assert.Single(Of(resumedSent, WorkerMessage.KindOneofCase.Guard, m => m.Guard));
        Assert.Equal((rollback.Step, rollback.RestoredStep, rollback.Reason, rollback.LrScale), (resumedRollback.Step, resumedRollback.RestoredStep, resumedRollback.Reason, resumedRollback.LrScale));
        Assert.Equal(reports.Skip(committed).Select(r => r.Loss), Of(resumedSent, WorkerMessage.KindOneofCase.Step, m => m.Step).Where(r => r.SampleCount > 0).Select(r => r.Loss));
        Assert.Equal(referenceGuard, resumedHolder.State!.Guard);
        reference.Dispose();
        resumedHolder.Dispose();
        Directory.Delete(output, recursive: true);
    }
}
