// A free worker's share of an evaluation job (EvaluateCheckpoint): load the committed step from the CheckpointStore, score
// its share of the tasks' batches, gather every share over the evaluation's ring (as a training job's checkpoint
// evaluation does: ScoreExchange), and on rank 0 combine them into the harness's results. Not part of any generation.
using System.Diagnostics;
using System.Net;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.ServiceDefaults;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using DeepSeekCluster.Training.IO;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;
using ExportStoreClient = DeepSeekCluster.Contracts.Checkpoints.ExportStore.ExportStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

public static class EvaluationShare
{
    /// <summary>
    /// Scores and returns the report to send up; every failure (the step, a task, the ring) becomes the report's error,
    /// since the Coordinator holds this worker until it hears one. <paramref name="collectivePort"/>: where the ring listens.
    /// </summary>
    public static async Task<EvaluationFinished> RunAsync(EvaluateCheckpoint order, WorkerSettings settings, int collectivePort, TextWriter log,
                                                         TrainingMetrics? metrics = null)
    {
        var report = new EvaluationFinished { EvaluationId = order.EvaluationId, Rank = order.Rank };
        string what = $"evaluation {order.EvaluationId} (rank {order.Rank})";
        if (await WorkOrder.InScratchAsync($"evaluation-{order.JobId}-", what, log, async scratch =>
            {
                using var dataChannel = ClusterChannel.For(settings.DataShards, settings.Tls, WorkerSettings.DataShardsKey, token: settings.Token);
                using var storeChannel = ClusterChannel.For(settings.Checkpoints, settings.Tls, WorkerSettings.CheckpointsKey, token: settings.Token);
                var reply = await new DataShards.DataShardsClient(dataChannel).GetTokenizerAsync(new GetManifestRequest { DatasetId = order.Dataset });
                var tokenizer = BpeTokenizer.FromJson(reply.TokenizerJson, $"dataset {order.Dataset}");
                var device = Training.Engine.StandaloneRun.ResolveDevice(settings.Device);

                using var model = order.ExportFormat.Length > 0
                    ? await FromExportAsync(order, new ExportStoreClient(storeChannel), settings.Checkpoints.ToString(), scratch)
                    : await FromCheckpointAsync(order, new CheckpointStoreClient(storeChannel), settings.Checkpoints.ToString(), scratch, tokenizer.Hash);
                var config = model.Config;
                model.to(device);
                model.eval();

                // ---- The plan (the same on every rank), this rank's share, the exchange ----
                int window = config.MaxPositionEmbeddings; // as the in-training evaluation: a long verse still fits
                var tasks = order.Tasks.Select(name => EvalTask.Resolve(name).Limited(order.Limit)).ToList();
                var plan = EvalPlan.Build(tasks, s => tokenizer.Encode(s), ModelEvaluation.PrefixToken(tokenizer, $"dataset {order.Dataset}"), window, order.BatchSize);
                using var ring = RunCancellation.ConnectRing(
                    () => new TcpRendezvous($"evaluation/{order.EvaluationId}", 1, order.LinkKey.ToByteArray(), order.Rank, order.World,
                                            new IPEndPoint(IPAddress.Any, collectivePort)),
                    [.. order.Peers], new TcpCollectiveOptions { Timeout = settings.CollectiveTimeout }, CancellationToken.None);
                var scorer = new ModelScorer(model, device, window);
                var (first, count) = plan.Share(order.Rank, order.World);
                var clock = Stopwatch.StartNew();
                var mine = plan.ScoreBatches(scorer, first, count);
                double seconds = clock.Elapsed.TotalSeconds;
                metrics?.EvaluationTokens(order.JobId, settings.WorkerId, scorer.TokensScored, seconds);
                var all = ScoreExchange.AllGather(plan, mine, ring);
                WorkOrder.Log(log, $"evaluation {order.EvaluationId}: rank {order.Rank}/{order.World} scored batches [{first}, {first + count}) of {plan.Batches.Count} " +
                         $"({scorer.TokensScored} tokens in {seconds:F1} s)");
                if (order.Rank != 0) return;
                var results = HarnessResults.Aggregate(plan.Tasks, all);
                foreach (var r in results) metrics?.EvaluationResult(order.JobId, settings.WorkerId, r);
                string json = HarnessResults.ToJson(results, plan.Tasks, $"{order.JobId}@{order.Step}", seconds, scorer.TokensScored).ToJsonString();
                // The scores are kept with what was scored in the store: the checkpoint's step folder, or the export's folder.
                var recorded = await new CheckpointStoreClient(storeChannel).RecordEvaluationAsync(new Contracts.Checkpoints.RecordEvaluationRequest
                {
                    Job = order.JobId, Step = order.Step, EvaluationId = order.EvaluationId, ResultsJson = json, ExportFormat = order.ExportFormat,
                });
                WorkOrder.Log(log, $"evaluation {order.EvaluationId}: results kept with the {(order.ExportFormat.Length == 0 ? "checkpoint" : $"{order.ExportFormat} export")} in the store ({recorded.Key})");
                report.ResultsJson = json;
            }) is { } error)
            report.Error = error;
        return report;
    }

    /// <summary>The committed step, any layout, every file's hash checked as it loads.</summary>
    static async Task<DeepSeekForCausalLM> FromCheckpointAsync(EvaluateCheckpoint order, CheckpointStoreClient client, string address, string scratch, string tokenizerHash)
    {
        string label = $"step {order.Step} of job '{order.JobId}'";
        var source = new GrpcCheckpointStore(client, address, order.JobId, scratch);
        var manifest = await source.ReadManifestAsync(order.Step);
        var config = manifest.Config is { } json
            ? DeepSeekConfig.FromJson(json.GetRawText(), $"the config.json of {label}").Validated()
            : throw new InvalidDataException($"{label}: its manifest has no config.json, so there is no model to score");
        var model = new DeepSeekForCausalLM(config);
        try { await ShardedCheckpointLoader.LoadReplicaAsync(source, order.Step, model, null, tokenizerHash); }
        catch { model.Dispose(); throw; }
        return model;
    }

    /// <summary>The store's export of the step (downloaded, every file's hash checked), loaded as float32.</summary>
    static async Task<DeepSeekForCausalLM> FromExportAsync(EvaluateCheckpoint order, ExportStoreClient client, string address, string scratch)
    {
        string folder = Path.Combine(scratch, "export");
        await new GrpcExportStore(client, address).DownloadAsync(new Contracts.Checkpoints.ExportKey { Job = order.JobId, Step = order.Step, Format = order.ExportFormat }, folder);
        return HfModelFolder.Load(folder).Model;
    }
}
