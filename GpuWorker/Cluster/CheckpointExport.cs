// A free worker's export of a committed checkpoint, ordered by the Coordinator (ExportCheckpoint): load the step from the
// CheckpointStore, export it into the store's exports/{job}/{step}/{format}/, answer ExportFinished. Not training: it
// runs beside the control stream, never inside a generation.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.ServiceDefaults;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Export;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;
using ExportStoreClient = DeepSeekCluster.Contracts.Checkpoints.ExportStore.ExportStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

public static class CheckpointExport
{
    /// <summary>
    /// Exports and returns the report to send up; every failure (no such step, a corrupt file, another run's tokenizer, a
    /// refusal by the store) becomes the report's error, since the Coordinator holds this worker until it hears one.
    /// </summary>
    public static async Task<ExportFinished> RunAsync(ExportCheckpoint order, WorkerSettings settings, TextWriter log)
    {
        var report = new ExportFinished { JobId = order.JobId, Step = order.Step, Format = order.Format };
        string what = $"export of step {order.Step} of job {order.JobId} as {order.Format}";
        if (await WorkOrder.InScratchAsync($"export-{order.JobId}-", what, log, async scratch =>
            {
                using var dataChannel = ClusterChannel.For(settings.DataShards, settings.Tls, WorkerSettings.DataShardsKey, token: settings.Token);
                using var storeChannel = ClusterChannel.For(settings.Checkpoints, settings.Tls, WorkerSettings.CheckpointsKey, token: settings.Token);
                var reply = await new DataShards.DataShardsClient(dataChannel).GetTokenizerAsync(new GetManifestRequest { DatasetId = order.Dataset });
                var tokenizer = BpeTokenizer.FromJson(reply.TokenizerJson, $"dataset {order.Dataset}");
                var source = new GrpcCheckpointStore(new CheckpointStoreClient(storeChannel), settings.Checkpoints.ToString(), order.JobId, Path.Combine(scratch, "staging"));
                var (folder, manifest) = await ModelExport.FromCheckpointAsync(source, order.Step, tokenizer, order.Format, Path.Combine(scratch, "exports"));
                report.ManifestKey = await new GrpcExportStore(new ExportStoreClient(storeChannel), settings.Checkpoints.ToString()).UploadAsync(folder, manifest);
                report.Files = manifest.Files.Count;
                report.Bytes = manifest.Files.Sum(f => f.Bytes);
                WorkOrder.Log(log, $"exported step {order.Step} of job {order.JobId} as {order.Format} into the store: {report.ManifestKey} ({report.Bytes} bytes in {report.Files} files)");
            }) is { } error)
            report.Error = error;
        return report;
    }
}
