// A job that starts from another job's committed checkpoint (JobSpec.startFrom, what a PBT exploit submits), on whole runs
// of one rank against the real DataShards and CheckpointStore services: the successor loads the source's checkpoint,
// trains on from its step exactly as the source did, and claims only the samples after it.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using CheckpointRef = DeepSeekCluster.Contracts.Grains.CheckpointRef;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class StartFromRunTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    DataShardsHost Data => fixture.Host;

    const int GlobalBatch = 4, Steps = 3;

    JobSpec Spec(string name) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = GlobalBatch, MicroBatch = 2,
        SeqLen = DataShardsHost.SeqLen, Steps = Steps, Schedule = new() { Kind = "constant", WarmupSteps = 1 }, CheckpointInterval = 2,
    };

    async Task<List<WorkerMessage>> RunAsync(JobSpec spec, long resumeStep, StoreHost store, string outputDir)
    {
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = spec.Name!, Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1, ResumeStep = resumeStep,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = outputDir,
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        lock (sent)
        {
            // Every step reported, or the run's log says why not.
            Assert.True(sent.Count(m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.SampleCount > 0) == Steps - resumeStep, $"the run of {spec.Name}:\n{log}");
            return [.. sent];
        }
    }

    [Fact]
    public async Task ASuccessorLoadsTheSourcesCommittedCheckpointAndTrainsOnAsTheSourceDid()
    {
        await using var store = await StoreHost.StartAsync();
        string output = Directory.CreateTempSubdirectory("run-startfrom-").FullName;

        // The source trains 3 steps and saves step 2; the test commits it as the Coordinator would.
        var source = await RunAsync(Spec("source"), 0, store, output);
        var saved = Assert.Single(source, m => m.KindCase == WorkerMessage.KindOneofCase.Checkpoint && m.Checkpoint.Step == 2).Checkpoint;
        Assert.True(saved.Error.Length == 0, saved.Error);
        var commit = new CommitCheckpointRequest { Job = "source", Step = 2, Generation = 1, ManifestJson = saved.ManifestJson };
        commit.Files.Add(new ExpectedFile { FileName = saved.File, Size = saved.SizeBytes, Sha256 = saved.Sha256 });
        await store.Client.CommitCheckpointAsync(commit);

        var successor = await RunAsync(Spec("successor") with { StartFrom = new CheckpointRef("source", 2) }, 2, store, output);
        var resumed = Assert.Single(successor, m => m.KindCase == WorkerMessage.KindOneofCase.Resumed).Resumed;
        Assert.Equal((2L, "checkpoint"), (resumed.Step, resumed.Source));
        var steps = successor.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.SampleCount > 0).Select(m => m.Step).ToList();
        var step3 = Assert.Single(steps);
        Assert.Equal((3L, 2L * GlobalBatch, (long)GlobalBatch), (step3.Step, step3.SampleStart, step3.SampleCount));
        // The same weights, moments and batch as the source's step 3: the same loss, to the bit.
        var sourceStep3 = source.Single(m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.Step == 3 && m.Step.SampleCount > 0).Step;
        Assert.Equal(sourceStep3.Loss, step3.Loss);
        Directory.Delete(output, recursive: true);
    }
}
