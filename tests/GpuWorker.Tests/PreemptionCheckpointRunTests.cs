// A preempted job's checkpoint-only generation (Assignment.checkpoint_only), on whole runs of one rank against the real
// DataShards and CheckpointStore services: the run stopped at a step boundary, the same worker saves the step its live
// state holds and trains nothing, and a later generation on a fresh worker resumes from that checkpoint and trains on
// exactly as an uninterrupted run did, claiming each sample once.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class PreemptionCheckpointRunTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    DataShardsHost Data => fixture.Host;

    const int GlobalBatch = 4, Steps = 4;

    // Checkpoints at 3 and 4 only: the preemption after step 2 finds no checkpoint of its step (the reference saves every step).
    JobSpec Spec(string name) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = GlobalBatch, MicroBatch = 2,
        SeqLen = DataShardsHost.SeqLen, Steps = Steps, Schedule = new() { Kind = "constant", WarmupSteps = 1 }, CheckpointInterval = 3,
    };

    /// <summary>One generation of rank 0 of 1; <paramref name="stopAfter"/>: cancelled at the boundary after that step (as a Rescale does).</summary>
    async Task<(List<WorkerMessage> Sent, string Log)> RunAsync(JobSpec spec, long generation, long resumeStep, bool checkpointOnly, ReplicaHolder holder,
                                                               StoreHost store, string outputDir, long? stopAfter = null)
    {
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = spec.Name!, Generation = generation, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1, ResumeStep = resumeStep,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" }, CheckpointOnly = checkpointOnly,
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = outputDir,
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        TrainingRun? run = null;
        run = new TrainingRun(assignment, settings, port, m =>
        {
            lock (sent) sent.Add(m);
            // The report is sent before the loop looks at its cancellation again: the run stops right after this step.
            if (m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.Step == stopAfter) run!.Cancel();
        }, new WorkerProgress(), log, replica: holder);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        lock (sent) return ([.. sent], log.ToString());
    }

    static List<StepReport> Trained(IEnumerable<WorkerMessage> sent) =>
        [.. sent.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.SampleCount > 0).Select(m => m.Step)];

    /// <summary>Commits the checkpoint a run reported, as the Coordinator would.</summary>
    static async Task CommitAsync(StoreHost store, string job, CheckpointReport saved)
    {
        Assert.True(saved.Error.Length == 0, saved.Error);
        var commit = new CommitCheckpointRequest { Job = job, Step = saved.Step, Generation = saved.Generation, ManifestJson = saved.ManifestJson };
        commit.Files.Add(new ExpectedFile { FileName = saved.File, Size = saved.SizeBytes, Sha256 = saved.Sha256 });
        await store.Client.CommitCheckpointAsync(commit);
    }

    [Fact]
    public async Task APreemptedRunSavesTheStepItHoldsAndTheNextGenerationResumesThereAsAnUninterruptedRunWould()
    {
        await using var store = await StoreHost.StartAsync();
        string output = Directory.CreateTempSubdirectory("run-preempt-").FullName;

        // The uninterrupted reference, saving every step. Both runs below start from its committed step 1 (startFrom):
        // a fresh start draws its weights from torch's process-wide generator, which tests running beside this one also draw from.
        var (reference, referenceLog) = await RunAsync(Spec("reference") with { CheckpointInterval = 1 }, 1, 0, false, new ReplicaHolder(), store, output);
        Assert.True(Trained(reference).Count == Steps, referenceLog);
        await CommitAsync(store, "reference", Assert.Single(reference, m => m.KindCase == WorkerMessage.KindOneofCase.Checkpoint && m.Checkpoint.Step == 1).Checkpoint);
        var job = Spec("job") with { StartFrom = new Contracts.Grains.CheckpointRef("reference", 1) };

        // Generation 1 trains step 2 and is stopped after it (the preemption's Rescale); the worker keeps its live state.
        var holder = new ReplicaHolder();
        var (first, firstLog) = await RunAsync(job, 1, 1, false, holder, store, output, stopAfter: 2);
        Assert.True(Trained(first).Select(s => s.Step).SequenceEqual([2L]), firstLog);
        Assert.DoesNotContain(first, m => m.KindCase == WorkerMessage.KindOneofCase.Checkpoint);

        // Generation 2, checkpoint-only: resumes from that live state, saves step 2, trains nothing.
        var (drain, drainLog) = await RunAsync(job, 2, 1, true, holder, store, output);
        var resumed = Assert.Single(drain, m => m.KindCase == WorkerMessage.KindOneofCase.Resumed).Resumed;
        Assert.True((2L, "replica") == (resumed.Step, resumed.Source), drainLog);
        Assert.DoesNotContain(drain, m => m.KindCase == WorkerMessage.KindOneofCase.Step);
        var saved = Assert.Single(drain, m => m.KindCase == WorkerMessage.KindOneofCase.Checkpoint).Checkpoint;
        Assert.Equal((2L, 2L), (saved.Step, saved.Generation));
        await CommitAsync(store, "job", saved);

        // Generation 3 on a fresh worker (no live state): from the committed step 2, steps 3 and 4, nothing redone.
        var (last, lastLog) = await RunAsync(job, 3, 2, false, new ReplicaHolder(), store, output);
        var resumedLast = Assert.Single(last, m => m.KindCase == WorkerMessage.KindOneofCase.Resumed).Resumed;
        Assert.True((2L, "checkpoint") == (resumedLast.Step, resumedLast.Source), lastLog);
        var steps = Trained(first).Concat(Trained(last)).ToList();
        Assert.Equal([2L, 3L, 4L], steps.Select(s => s.Step));
        // Every sample of global batches 2..4 claimed once, in order (step 1's are the reference's lineage).
        Assert.Equal(Enumerable.Range(1, Steps - 1).Select(i => ((long)i * GlobalBatch, (long)GlobalBatch)), steps.Select(s => (s.SampleStart, (long)s.SampleCount)));
        // The weights, moments and batches of the uninterrupted run: the same losses, to the bit.
        Assert.Equal(Trained(reference).Skip(1).Select(s => s.Loss), steps.Select(s => s.Loss));
        Directory.Delete(output, recursive: true);
    }
}
