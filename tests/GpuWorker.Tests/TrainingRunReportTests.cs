// A whole training run of one rank against the real DataShards and CheckpointStore services: its step reports claim
// exactly the samples the data service served (the exactly-once ledger is built from them), it validates at the spec's
// interval and reports the loss on that step, and it ends with a sample from the spec's prompt and its model in the store
// (the step's hf export), with no model folder left on the worker's disk.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class TrainingRunReportTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    DataShardsHost Data => fixture.Host;

    [Fact]
    public async Task StepReportsClaimTheSamplesTheServiceServedAndCarryTheValidationAtTheInterval()
    {
        const int seed = 4242, globalBatch = 4;
        await using var store = await StoreHost.StartAsync();
        var spec = new JobSpec
        {
            Name = "served", ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = globalBatch, MicroBatch = 2,
            SeqLen = DataShardsHost.SeqLen, Steps = 3, Seed = seed, EvalInterval = 2, SamplePrompt = "And God said",
            Schedule = new() { WarmupSteps = 1 },
        };
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = "served", Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = Directory.CreateTempSubdirectory("run-reports-").FullName,
        };
        // A faulty service: step 1's share [4, 8) is answered with samples [5, 9), whether asked by a fetch or a prefetch.
        Data.Calls.Rewrite = r => r.Seed == seed && r.Split == "train" && r.Start == globalBatch ? new GetBatchRequest(r) { Start = globalBatch + 1 } : null;
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        try
        {
            var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
            await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        }
        finally { Data.Calls.Rewrite = null; }

        string output = log.ToString();
        List<StepReport> steps;
        ModelSaved saved;
        lock (sent)
        {
            Assert.DoesNotContain(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Leaving);
            steps = [.. sent.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Step).Select(m => m.Step)];
            saved = Assert.Single(sent, m => m.KindCase == WorkerMessage.KindOneofCase.ModelSaved).ModelSaved;
        }
        // Three step reports, then the end's validation of step 3 as a report of no samples (the job's curve ends there).
        Assert.Equal([1L, 2, 3, 3], steps.Select(s => s.Step));
        // What the service served, not step × global batch: the ledger would see step 1's gap at 4 and sample 8 twice.
        Assert.Equal([(0L, 4), (5L, 4), (8L, 4), (0L, 0)], steps.Select(s => (s.SampleStart, s.SampleCount)));
        Assert.Equal([false, true, false, true], steps.Select(s => s.HasValidation));
        Assert.True(steps[1].ValidationLoss is > 0 and < 20, $"validation loss {steps[1].ValidationLoss}: {output}");
        Assert.True(steps[3].ValidationLoss is > 0 and < 20, $"final validation loss {steps[3].ValidationLoss}: {output}");
        Assert.Contains($"validation loss {steps[3].ValidationLoss:F4}", output);
        Assert.Contains("sample: And God said", output);
        // The model is step 3's hf export in the store, and nothing of it stays on this disk (no folder, no staging).
        Assert.Equal((3L, "exports/served/3/hf"), (saved.Step, saved.Path));
        var exported = (await new Contracts.Checkpoints.ExportStore.ExportStoreClient(store.Channel).ListExportsAsync(new() { Job = "served" })).Exports;
        Assert.Equal(["served/3/hf"], exported.Select(e => $"{e.Export.Job}/{e.Export.Step}/{e.Export.Format}"));
        Assert.Contains("config.json", exported[0].ManifestJson);
        Assert.Contains("model saved to the checkpoint store as exports/served/3/hf", output);
        Assert.False(Directory.Exists(Path.Combine(settings.OutputDir, "served")), output);
        var staging = Path.Combine(settings.OutputDir, "final-model-staging");
        Assert.True(Directory.Exists(staging), output);
        Assert.Empty(Directory.EnumerateFiles(staging, "*", SearchOption.AllDirectories));
        Directory.Delete(settings.OutputDir, recursive: true);
    }

    /// <summary>
    /// A worker whose memory budget is below the plan's predicted bytes refuses the job at formation, before it builds a
    /// model or connects a ring: it leaves failed, naming the plan, each kind of bytes and the budget, and trains nothing.
    /// </summary>
    [Fact]
    public async Task APlanThatDoesNotFitTheWorkersMemoryIsRefusedBeforeAnythingStartsNamingTheBytes()
    {
        await using var store = await StoreHost.StartAsync();
        var spec = new JobSpec
        {
            Name = "too-big", ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 4, MicroBatch = 2,
            SeqLen = DataShardsHost.SeqLen, Steps = 3, Parallel = new() { Zero = 1 },
        };
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = "too-big", Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = Directory.CreateTempSubdirectory("run-refused-").FullName, MemoryBudgetBytes = 1 << 20,
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(2));

        lock (sent)
        {
            Assert.DoesNotContain(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Step);
            var leaving = Assert.Single(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Leaving).Leaving;
            Assert.True(leaving.Failed);
            foreach (var part in new[] { "dp 1 x pp 1", "zero 1", "does not fit", "parameters", "gradients", "optimizer", "activations", "1 MiB of Worker:MemoryBudgetBytes" })
                Assert.Contains(part, leaving.Reason);
        }
        Directory.Delete(settings.OutputDir, recursive: true);
    }
}
