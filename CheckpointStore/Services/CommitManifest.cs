// What a commit writes into manifest.json (job, step, generation, files; the committer's own fields kept) and how a second
// commit of the same step is judged. Not storage: CheckpointStoreService reads and writes the blob.
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Services.CheckpointKeys;

namespace DeepSeekCluster.CheckpointStore.Services;

internal static class CommitManifest
{
    /// <summary>The manifest of a commit: the committer's own fields, checked against what the commit itself says.</summary>
    public static JsonObject Build(CommitCheckpointRequest request, string job, long step, List<ExpectedFile> files)
    {
        JsonObject manifest;
        try
        {
            manifest = string.IsNullOrWhiteSpace(request.ManifestJson)
                ? new JsonObject()
                : JsonNode.Parse(request.ManifestJson) as JsonObject ?? throw Invalid("manifest_json is not a JSON object");
        }
        catch (JsonException e)
        {
            throw Invalid($"manifest_json is not valid JSON: {e.Message}");
        }
        void Own(string name, JsonNode value)
        {
            if (manifest[name] is { } given && !JsonNode.DeepEquals(given, value))
                throw Invalid($"manifest_json has \"{name}\": {given.ToJsonString()}, but the commit says {value.ToJsonString()}");
            manifest[name] = value;
        }
        Own("job", JsonValue.Create(job));
        Own("step", JsonValue.Create(step));
        Own("generation", JsonValue.Create(request.Generation));
        Own("files", new JsonArray(files.Select(f => (JsonNode)new JsonObject
        {
            ["name"] = f.FileName, ["size"] = f.Size, ["sha256"] = f.Sha256,
        }).ToArray()));
        manifest.Remove("committed_utc");
        manifest["committed_utc"] = DateTime.UtcNow.ToString("O");
        return manifest;
    }

    /// <summary>A retried commit (same generation, same files) is answered as done; anything else is a second writer and refused.</summary>
    public static CommitCheckpointReply SameCommitOrRefuse(JsonObject committed, long generation, List<ExpectedFile> files, string job, long step, string manifestKey)
    {
        var (committedGeneration, committedFiles) = Summary(committed);
        bool same = committedGeneration == generation
            && committedFiles.Count == files.Count
            && committedFiles.Zip(files).All(p => p.First.Name == p.Second.FileName && p.First.Size == p.Second.Size && p.First.Sha256 == p.Second.Sha256);
        if (!same)
        {
            throw new RpcException(new Status(StatusCode.AlreadyExists,
                $"step {step} of job '{job}' is already committed by generation {committedGeneration} with other files; a second writer cannot replace it"));
        }
        return new CommitCheckpointReply { AlreadyCommitted = true, ManifestPath = manifestKey };
    }

    /// <summary>A manifest's generation and (name, size, SHA-256) of its files, by name.</summary>
    public static (long Generation, List<(string Name, long Size, string Sha256)> Files) Summary(JsonObject manifest)
    {
        long generation = manifest["generation"]?.GetValue<long>() ?? -1;
        var files = (manifest["files"] as JsonArray ?? [])
            .Select(f => (f!["name"]!.GetValue<string>(), f["size"]!.GetValue<long>(), f["sha256"]!.GetValue<string>()))
            .OrderBy(f => f.Item1, StringComparer.Ordinal)
            .ToList();
        return (generation, files);
    }
}
