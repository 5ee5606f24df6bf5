// The ExportStore gRPC service: whole-file uploads of an export, a commit that checks them and writes export.json last,
// listing and hash-checked downloads. Keys: exports/{job}/{step:D8}/{format}/{path}. Not for checkpoints (CheckpointStoreService).
using System.Security.Cryptography;
using System.Text.Json;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.Contracts.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Services.CheckpointKeys;

namespace DeepSeekCluster.CheckpointStore.Services;

public sealed class ExportStoreService(IBlobBackend blobs, BlobRetry retry, ILogger<ExportStoreService> logger) : ExportStore.ExportStoreBase
{
    private const string ShaKey = "sha256";
    private const int DownloadChunkBytes = 1 << 20;
    private static readonly Dictionary<string, string> NoMetadata = new();

    public override async Task<UploadExportFileReply> UploadExportFile(IAsyncStreamReader<UploadExportFileMessage> requestStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requestStream.MoveNext(ct) || requestStream.Current.KindCase != UploadExportFileMessage.KindOneofCase.Header)
            throw Invalid("the first UploadExportFile message must be the header");
        var header = requestStream.Current.Header;
        string folder = ExportKeys.Folder(header.Export);
        string key = folder + ExportKeys.Path(header.Path);
        string sha = Sha256(header.Sha256, $"{header.Path}'s");
        long total = header.TotalSize >= 0 ? header.TotalSize : throw Invalid($"total size {header.TotalSize} of {header.Path} is negative");
        await RefuseIfCommittedAsync(folder, ct);

        // Staged under the announced hash, published only once every byte is in and hashes to it: no partial file is ever visible.
        if (await retry.RunAsync($"read the staged length of {key}", c => blobs.GetStagedLengthAsync(key, sha, c), ct) > 0)
            await retry.RunAsync($"discard earlier staged bytes of {key}", c => blobs.DeleteAsync(key, c), ct);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        long received = 0;
        while (await requestStream.MoveNext(ct))
        {
            var message = requestStream.Current;
            if (message.KindCase != UploadExportFileMessage.KindOneofCase.Data) throw Invalid($"a second header arrived in the upload of {header.Path}");
            var data = message.Data.Memory;
            if (received + data.Length > total) throw Invalid($"{header.Path}: bytes run past the announced total size of {total}");
            long at = received;
            await retry.RunAsync($"stage bytes [{at}, {at + data.Length}) of {key}", c => blobs.AppendStagedAsync(key, sha, at, data, c), ct);
            hash.AppendData(data.Span);
            received += data.Length;
        }
        if (received != total) throw Refused($"{header.Path}: the stream ended after {received} of {total} bytes");
        string actual = Convert.ToHexStringLower(hash.GetHashAndReset());
        if (actual != sha)
        {
            await retry.RunAsync($"discard the staged bytes of {key}", c => blobs.DeleteAsync(key, c), ct);
            throw new RpcException(new Status(StatusCode.DataLoss, $"{header.Path}: the {total} bytes received hash to {actual}, not the announced {sha}; discarded"));
        }
        await retry.RunAsync($"publish {key}", c => blobs.CommitStagedAsync(key, sha, total, new Dictionary<string, string> { [ShaKey] = sha }, c), ct);
        return new UploadExportFileReply { Key = key, Size = total };
    }

    public override async Task<CommitExportReply> CommitExport(CommitExportRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string folder = ExportKeys.Folder(request.Export);
        string manifestKey = folder + ExportKeys.ManifestName;
        var files = ExportKeys.ParseManifest(request.ManifestJson, request.Export);
        var problems = new List<string>();
        foreach (var (path, bytes, sha) in files)
        {
            var info = await retry.RunAsync($"read the properties of {folder}{path}", c => blobs.GetInfoAsync(folder + path, c), ct);
            if (info is null) problems.Add($"{path} was never uploaded");
            else if (info.Size != bytes || info.Metadata.GetValueOrDefault(ShaKey) != sha)
                problems.Add($"{path} is stored with {info.Size} bytes and SHA-256 {info.Metadata.GetValueOrDefault(ShaKey) ?? "unknown"}, export.json says {bytes} and {sha}");
        }
        var existing = await retry.RunAsync($"read the properties of {manifestKey}", c => blobs.GetInfoAsync(manifestKey, c), ct);
        if (existing is not null)
        {
            string stored = await ReadTextAsync(manifestKey, existing.Size, ct);
            if (stored == request.ManifestJson) return new CommitExportReply { ManifestKey = manifestKey, AlreadyCommitted = true };
            throw Refused($"export {folder} is already committed with another export.json; exports are immutable");
        }
        if (problems.Count > 0)
        {
            await DeleteFolderAsync(folder, ct);
            throw Refused($"export {folder} refused, its files deleted: {string.Join("; ", problems)}");
        }
        var json = System.Text.Encoding.UTF8.GetBytes(request.ManifestJson);
        if (!await retry.RunAsync($"write {manifestKey}", c => blobs.PutAsync(manifestKey, json, NoMetadata, onlyIfAbsent: true, c), ct))
            throw Refused($"export {folder} was committed by another caller meanwhile");
        logger.LogInformation("Committed export {Folder} ({Files} files)", folder, files.Count);
        return new CommitExportReply { ManifestKey = manifestKey };
    }

    public override async Task<ListExportsReply> ListExports(ListExportsRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string prefix = $"{ExportKeys.Root}{Job(request.Job)}/";
        var entries = await retry.RunAsync($"list {prefix}", c => blobs.ListAsync(prefix, includeStaged: false, c), ct);
        var reply = new ListExportsReply();
        foreach (var entry in entries.Where(e => e.Key.EndsWith("/" + ExportKeys.ManifestName, StringComparison.Ordinal)).OrderBy(e => e.Key, StringComparer.Ordinal))
        {
            var parts = entry.Key[prefix.Length..].Split('/');
            if (parts.Length != 3 || !long.TryParse(parts[0], out long step)) continue;
            var key = new ExportKey { Job = request.Job, Step = step, Format = parts[1] };
            string json = await ReadTextAsync(entry.Key, entry.Size, ct);
            var files = ExportKeys.ParseManifest(json, key);
            reply.Exports.Add(new ExportSummary { Export = key, FileCount = files.Count, TotalBytes = files.Sum(f => f.Bytes), ManifestJson = json });
        }
        return reply;
    }

    public override async Task DownloadExportFile(DownloadExportFileRequest request, IServerStreamWriter<ExportFileChunk> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string folder = ExportKeys.Folder(request.Export);
        string path = ExportKeys.Path(request.Path);
        var manifest = await retry.RunAsync($"read the properties of {folder}{ExportKeys.ManifestName}", c => blobs.GetInfoAsync(folder + ExportKeys.ManifestName, c), ct)
            ?? throw NotFound($"export {folder} is not committed");
        var files = ExportKeys.ParseManifest(await ReadTextAsync(folder + ExportKeys.ManifestName, manifest.Size, ct), request.Export);
        var (_, bytes, sha) = files.FirstOrDefault(f => f.Path == path);
        if (sha is null) throw NotFound($"export {folder} has no file '{path}'");
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = new byte[DownloadChunkBytes];
        for (long at = 0; at < bytes; at += DownloadChunkBytes)
        {
            var chunk = buffer.AsMemory(0, (int)Math.Min(DownloadChunkBytes, bytes - at));
            long from = at;
            await retry.RunAsync($"read {folder}{path}", c => blobs.ReadAsync(folder + path, from, chunk, c), ct);
            hash.AppendData(chunk.Span);
            // The last chunk is sent only once the whole file matched export.json: a reader never ends with unchecked bytes.
            if (at + chunk.Length == bytes && Convert.ToHexStringLower(hash.GetHashAndReset()) != sha)
                throw new RpcException(new Status(StatusCode.DataLoss, $"{folder}{path}: the stored bytes no longer hash to the SHA-256 in export.json"));
            await responseStream.WriteAsync(new ExportFileChunk { Data = ByteString.CopyFrom(chunk.Span) }, ct);
        }
    }

    private async Task RefuseIfCommittedAsync(string folder, CancellationToken ct)
    {
        if (await retry.RunAsync($"read the properties of {folder}{ExportKeys.ManifestName}", c => blobs.GetInfoAsync(folder + ExportKeys.ManifestName, c), ct) is not null)
            throw Refused($"export {folder} is committed; its files cannot change");
    }

    private async Task DeleteFolderAsync(string folder, CancellationToken ct)
    {
        foreach (var entry in await retry.RunAsync($"list {folder}", c => blobs.ListAsync(folder, includeStaged: true, c), ct))
            await retry.RunAsync($"delete {entry.Key}", c => blobs.DeleteAsync(entry.Key, c), ct);
    }

    private async Task<string> ReadTextAsync(string key, long size, CancellationToken ct)
    {
        var buffer = new byte[size];
        await retry.RunAsync($"read {key}", c => blobs.ReadAsync(key, 0, buffer, c), ct);
        return System.Text.Encoding.UTF8.GetString(buffer);
    }
}

/// <summary>Keys and names of exports, validated as the checkpoint keys are.</summary>
internal static class ExportKeys
{
    public const string Root = "exports/";
    public const string ManifestName = "export.json";
    public static readonly string[] Formats = ["hf", "hf-bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "onnx"];

    public static string Folder(ExportKey? key)
    {
        if (key is null) throw Invalid("the export (job, step, format) is missing");
        if (!Formats.Contains(key.Format)) throw Invalid($"unknown export format '{key.Format}': expected one of {string.Join(", ", Formats)}");
        return $"{Root}{Job(key.Job)}/{Step(key.Step):D8}/{key.Format}/";
    }

    public static string Path(string path)
    {
        var segments = (path ?? "").Split('/');
        if (segments.Length == 0 || path == ManifestName || segments.Any(s => s.Length == 0 || s.Contains("..") || !IsSafeName(s)))
            throw Invalid($"export file path '{path}' is not valid: expected '/'-separated names of letters, digits, '.', '_' or '-' (and not {ManifestName}, which the commit writes)");
        return path!;
    }

    /// <summary>The files an export.json lists, after checking it names this export.</summary>
    public static List<(string Path, long Bytes, string Sha256)> ParseManifest(string json, ExportKey key)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            var root = doc.RootElement;
            if (root.GetProperty("format").GetString() != key.Format || root.GetProperty("job").GetString() != key.Job || root.GetProperty("step").GetInt64() != key.Step)
                throw Invalid($"export.json names another export than {key.Job}/{key.Step}/{key.Format}");
            return root.GetProperty("files").EnumerateArray()
                .Select(f => (Path(f.GetProperty("path").GetString()!), f.GetProperty("bytes").GetInt64(), Sha256(f.GetProperty("sha256").GetString()!, "an export file's")))
                .ToList();
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw Invalid($"export.json is not a valid export manifest ({e.Message}): expected format, job, step and files [{{path, bytes, sha256}}]");
        }
    }
}
