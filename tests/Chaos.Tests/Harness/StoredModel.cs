// A cluster job's final model lives in the CheckpointStore (exports/{job}/{step}/hf), not on a worker's disk: the tests
// that compare models byte for byte download its weights file from there, hash-checked by the store as it streams.
using System.Text.Json;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using Grpc.Net.Client;

namespace DeepSeekCluster.Chaos;

public static class StoredModel
{
    /// <summary>Downloads model.safetensors of the job's hf export of <paramref name="step"/> into <paramref name="target"/>.</summary>
    public static async Task<string> DownloadWeightsAsync(string storeGrpcUrl, string? token, string job, long step, string target, CancellationToken ct = default)
    {
        using var channel = GrpcChannel.ForAddress(storeGrpcUrl);
        var headers = token is null ? null : new Metadata { { "authorization", $"Bearer {token}" } };
        using var call = new ExportStore.ExportStoreClient(channel).DownloadExportFile(new DownloadExportFileRequest
        {
            Export = new ExportKey { Job = job, Step = step, Format = "hf" }, Path = "model.safetensors",
        }, headers, cancellationToken: ct);
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        await using var file = File.Create(target);
        await foreach (var chunk in call.ResponseStream.ReadAllAsync(ct)) await file.WriteAsync(chunk.Data.Memory, ct);
        return target;
    }

    /// <summary>The CheckpointStore's gRPC URL an AppHost run lists in {runDir}/endpoints.json.</summary>
    public static string StoreOfAppHostRun(string runDir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(runDir, "endpoints.json")));
        return doc.RootElement.GetProperty("instances").EnumerateArray()
            .Single(i => i.GetProperty("resource").GetString() == "checkpoints")
            .GetProperty("endpoints").GetProperty("grpc").GetString()!;
    }
}
