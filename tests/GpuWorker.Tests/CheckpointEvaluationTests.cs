// A job with evalTasks, run by one rank against the real DataShards and CheckpointStore services: the reports of its
// scheduled checkpoint steps carry the tasks' results in lm-evaluation-harness's JSON, and no other step's does.
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class CheckpointEvaluationTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    [Fact]
    public async Task TheScheduledCheckpointStepsReportTheTasksResults()
    {
        await using var store = await StoreHost.StartAsync();
        var spec = new JobSpec
        {
            Name = "evaluated", ModelPreset = "tiny", Dataset = fixture.Host.DatasetId, GlobalBatch = 2, MicroBatch = 2,
            SeqLen = DataShardsHost.SeqLen, Steps = 2, CheckpointInterval = 1, Schedule = new() { WarmupSteps = 1 },
            EvalTasks = ["kjv_nextverse", "kjv_cloze"], EvalLimit = 3,
        };
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = "evaluated", Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        var settings = new WorkerSettings
        {
            Coordinator = fixture.Host.Address, DataShards = fixture.Host.Address, Checkpoints = new Uri(store.Address), Token = "t",
            WorkerId = "w", Device = "cpu", OutputDir = Directory.CreateTempSubdirectory("run-eval-").FullName,
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        try
        {
            var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
            await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        }
        finally { Directory.Delete(settings.OutputDir, recursive: true); }

        List<StepReport> steps;
        lock (sent) steps = [.. sent.Where(m => m.KindCase == WorkerMessage.KindOneofCase.Step).Select(m => m.Step)];
        var output = log.ToString();
        // Steps 1 (checkpointInterval) and 2 (the last) are evaluated; the end's validation report is not.
        Assert.Equal([true, true, false], steps.Select(s => s.EvalResultsJson.Length > 0));
        foreach (var report in steps.Where(s => s.EvalResultsJson.Length > 0))
        {
            using var doc = JsonDocument.Parse(report.EvalResultsJson);
            var results = doc.RootElement.GetProperty("results");
            Assert.InRange(results.GetProperty("kjv_nextverse").GetProperty("acc,none").GetDouble(), 0, 1);
            Assert.True(results.GetProperty("kjv_cloze").GetProperty("perplexity,none").GetDouble() > 1, output);
            Assert.Equal(3, doc.RootElement.GetProperty("n-samples").GetProperty("kjv_cloze").GetProperty("effective").GetInt32());
        }
        Assert.Contains("evaluation at step 1: kjv_nextverse acc ", output);
    }
}
