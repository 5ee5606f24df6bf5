// The step guard on a whole run of one rank against the real DataShards and CheckpointStore services: an injected NaN
// step is skipped, an injected loss spike rolls the live state back to the last snapshot, each is reported with its
// reason, and the step reports still claim every sample exactly once (the ledger the Coordinator builds from them).
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
            Guard = new StepGuardSpec { Rollback = true, Window = 8, MinHistory = 3, SnapshotEvery = 2, LrFactor = 0.5, MaxRollbacks = 1 },
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
}
