// The scores of a committed step: an evaluation job's results (or a training job's own at the checkpoint), written once
// into the step's folder ({job}/{step:D8}/evaluations/{id}.json), so they travel with the checkpoint and retention deletes
// them with it; an export's scores likewise into the committed export's folder (exports/{job}/{step:D8}/{format}/evaluations/).
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Services.CheckpointKeys;

namespace DeepSeekCluster.CheckpointStore.Services;

public sealed partial class CheckpointStoreService
{
    const string EvaluationsFolder = "evaluations/";
    const int MaxResultsBytes = 4 << 20;

    /// <summary>Where the scores of the committed step (or of its committed export <paramref name="exportFormat"/>) are kept; NotFound when it is not committed.</summary>
    async Task<string> EvaluationsFolderAsync(string job, long step, string exportFormat, CancellationToken ct)
    {
        if (string.IsNullOrEmpty(exportFormat))
        {
            if (await ReadManifestAsync(Manifest(job, step), ct) is null)
                throw NotFound($"step {step} of job '{job}' is not committed (it has no {ManifestName}): scores are kept only with a committed checkpoint");
            return StepPrefix(job, step) + EvaluationsFolder;
        }
        string export = ExportKeys.Folder(new ExportKey { Job = job, Step = step, Format = exportFormat });
        if (await retry.RunAsync($"read the properties of {export}{ExportKeys.ManifestName}", c => blobs.GetInfoAsync(export + ExportKeys.ManifestName, c), ct) is null)
            throw NotFound($"export {export} is not committed (it has no {ExportKeys.ManifestName}): scores are kept only with a committed export");
        return export + EvaluationsFolder;
    }

    public override async Task<RecordEvaluationReply> RecordEvaluation(RecordEvaluationRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string job = Job(request.Job);
        long step = Step(request.Step);
        if (!IsSafeName(request.EvaluationId ?? ""))
            throw Invalid($"evaluation_id '{request.EvaluationId}' is not valid: expected 1-128 letters, digits, '.', '_' or '-'");
        byte[] bytes = Encoding.UTF8.GetBytes(request.ResultsJson ?? "");
        if (bytes.Length > MaxResultsBytes) throw Invalid($"results_json is {bytes.Length} bytes; at most {MaxResultsBytes} are kept with a checkpoint");
        try
        {
            if (JsonNode.Parse(bytes) is not JsonObject { } results || results["results"] is not JsonObject)
                throw Invalid("results_json must be a JSON object with a \"results\" object (lm-evaluation-harness's shape)");
        }
        catch (JsonException e) { throw Invalid($"results_json is not JSON: {e.Message}"); }
        string folder = await EvaluationsFolderAsync(job, step, request.ExportFormat, ct);
        string key = folder + request.EvaluationId + ".json";
        var metadata = new Dictionary<string, string> { ["evaluation"] = request.EvaluationId! };
        if (await retry.RunAsync($"write {key}", c => blobs.PutAsync(key, bytes, metadata, onlyIfAbsent: true, c), ct))
        {
            logger.LogInformation("Recorded evaluation {Evaluation} with step {Step} of job {Job}", request.EvaluationId, step, job);
            return new RecordEvaluationReply { Key = key };
        }
        // Written before: a retry of the same scores is fine, other scores under the same id are refused (records are immutable).
        byte[] stored = await ReadWholeAsync(key, ct);
        if (stored.AsSpan().SequenceEqual(bytes)) return new RecordEvaluationReply { Key = key, AlreadyRecorded = true };
        throw new RpcException(new Status(StatusCode.AlreadyExists,
            $"evaluation '{request.EvaluationId}' of step {step} of job '{job}' is recorded with other results; a record is never replaced"));
    }

    public override async Task<ListEvaluationsReply> ListEvaluations(ListEvaluationsRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string job = Job(request.Job);
        long step = Step(request.Step);
        string prefix = await EvaluationsFolderAsync(job, step, request.ExportFormat, ct);
        var reply = new ListEvaluationsReply();
        foreach (var entry in (await retry.RunAsync($"list {prefix}", c => blobs.ListAsync(prefix, includeStaged: false, c), ct)).OrderBy(e => e.Key, StringComparer.Ordinal))
        {
            if (!entry.Key.EndsWith(".json", StringComparison.Ordinal)) continue;
            string id = entry.Key[prefix.Length..^".json".Length];
            reply.Evaluations.Add(new StoredEvaluation { EvaluationId = id, ResultsJson = Encoding.UTF8.GetString(await ReadWholeAsync(entry.Key, ct)) });
        }
        return reply;
    }

    async Task<byte[]> ReadWholeAsync(string key, CancellationToken ct)
    {
        var info = await retry.RunAsync($"read the properties of {key}", c => blobs.GetInfoAsync(key, c), ct)
                   ?? throw NotFound($"{key} is gone (retention deleted its step meanwhile)");
        byte[] bytes = new byte[info.Size];
        await retry.RunAsync($"read {key}", c => blobs.ReadAsync(key, 0, bytes, c), ct);
        return bytes;
    }
}
