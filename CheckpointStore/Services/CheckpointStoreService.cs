// The CheckpointStore gRPC service: resumable shard uploads, two-phase commit with manifest.json last, ranged tensor downloads,
// retention. The chunk-hash records of stored files are StoredChunkRecords'; the manifest's content is CommitManifest's.
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.Contracts.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Options;
using static DeepSeekCluster.CheckpointStore.Services.CheckpointKeys;

namespace DeepSeekCluster.CheckpointStore.Services;

public sealed partial class CheckpointStoreService(IBlobBackend blobs, BlobRetry retry, IOptions<StorageOptions> options, VerifiedChunkCache verified,
    ILogger<CheckpointStoreService> logger)
    : Contracts.Checkpoints.CheckpointStore.CheckpointStoreBase
{
    private const string ShaKey = "sha256"; // blob metadata: set only once the store has hashed the bytes itself
    private const int DownloadChunkBytes = 1 << 20;
    private static readonly Dictionary<string, string> NoMetadata = new();
    private readonly StoredChunkRecords chunkRecords = new(blobs, retry);

    // ---- Upload ----

    public override async Task<UploadStatusReply> GetUploadStatus(UploadStatusRequest request, ServerCallContext context)
    {
        string key = File(Job(request.Job), Step(request.Step), FileName(request.FileName));
        string sha = Sha256(request.Sha256, "the upload's");
        var ct = context.CancellationToken;
        var info = await retry.RunAsync($"read the properties of {key}", c => blobs.GetInfoAsync(key, c), ct);
        if (info is not null && info.Metadata.GetValueOrDefault(ShaKey) == sha)
            return new UploadStatusReply { ReceivedBytes = info.Size, Complete = true };
        long staged = await retry.RunAsync($"read the staged length of {key}", c => blobs.GetStagedLengthAsync(key, sha, c), ct);
        return new UploadStatusReply { ReceivedBytes = staged };
    }

    public override async Task<UploadShardReply> UploadShard(IAsyncStreamReader<UploadShardMessage> requestStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requestStream.MoveNext(ct) || requestStream.Current.KindCase != UploadShardMessage.KindOneofCase.Header)
            throw Invalid("the first UploadShard message must be the header");
        var header = requestStream.Current.Header;
        string job = Job(header.Job);
        long step = Step(header.Step);
        if (header.Rank < 0) throw Invalid($"rank {header.Rank} is negative");
        string fileName = FileName(string.IsNullOrEmpty(header.FileName) ? RankFile(header.Rank) : header.FileName);
        string sha = Sha256(header.Sha256, $"{fileName}'s");
        long total = header.TotalSize >= 0 ? header.TotalSize : throw Invalid($"total size {header.TotalSize} of {fileName} is negative");
        var announced = ChunkHashes.Announced(header.ChunkBytes, header.ChunkXxh128, total, fileName);
        long chunkBytes = announced?.ChunkBytes ?? ChunkHashes.DefaultChunkBytes;
        string key = File(job, step, fileName);
        await RefuseIfCommittedAsync(job, step, fileName, ct);

        var existing = await retry.RunAsync($"read the properties of {key}", c => blobs.GetInfoAsync(key, c), ct);
        if (existing is not null && existing.Size == total && existing.Metadata.GetValueOrDefault(ShaKey) == sha)
        {
            // Already stored: nothing to receive. Its chunk hashes are those recorded, or (other chunks announced, or none
            // recorded by an older store) computed now from the stored bytes.
            var recorded = await chunkRecords.ReadAsync(key, existing, ct);
            if (recorded is null || announced is not null && !announced.SameAs(recorded))
            {
                var (_, actual) = await chunkRecords.HashBlobAsync(key, total, chunkBytes, ct);
                await RefuseChunkMismatchAsync(announced, actual, key, fileName, total, "stored", ct, discard: false); // its SHA-256 matched: kept
                recorded = actual;
                await chunkRecords.RecordAsync(key, recorded, new Dictionary<string, string>(existing.Metadata) { [ShaKey] = sha }, ct);
            }
            return Reply(fileName, total, sha, recorded);
        }

        long staged = await retry.RunAsync($"read the staged length of {key}", c => blobs.GetStagedLengthAsync(key, sha, c), ct);
        // Hashing as bytes arrive covers an upload that starts at 0; a resumed one is hashed by reading it back.
        using var hash = staged == 0 ? IncrementalHash.CreateHash(HashAlgorithmName.SHA256) : null;
        var chunker = staged == 0 ? new ChunkHasher(chunkBytes) : null;
        var block = new MemoryStream();
        int blockBytes = options.Value.BlockBytes;

        async Task FlushAsync()
        {
            if (block.Length == 0) return;
            var data = new ReadOnlyMemory<byte>(block.GetBuffer(), 0, (int)block.Length);
            long at = staged;
            await retry.RunAsync($"stage bytes [{at}, {at + data.Length}) of {key}", c => blobs.AppendStagedAsync(key, sha, at, data, c), ct);
            hash?.AppendData(data.Span);
            chunker?.Append(data.Span);
            staged += data.Length;
            block.SetLength(0);
        }

        while (await requestStream.MoveNext(ct))
        {
            var message = requestStream.Current;
            if (message.KindCase != UploadShardMessage.KindOneofCase.Chunk) throw Invalid($"a second header arrived in the upload of {fileName}");
            long expected = staged + block.Length;
            if (message.Chunk.Offset != expected)
            {
                throw Refused($"{fileName}: a chunk starts at byte {message.Chunk.Offset} but the store holds {expected} bytes; resume from GetUploadStatus.ReceivedBytes");
            }
            if (expected + message.Chunk.Data.Length > total)
                throw Invalid($"{fileName}: chunks run past the announced total size of {total} bytes");
            message.Chunk.Data.WriteTo(block);
            if (block.Length >= blockBytes) await FlushAsync();
        }
        await FlushAsync();

        if (staged != total)
            throw Refused($"{fileName}: the stream ended after {staged} of {total} bytes; send the rest from offset {staged}");
        await RefuseIfCommittedAsync(job, step, fileName, ct);

        ChunkHashes chunks;
        if (hash is not null)
        {
            string actual = Convert.ToHexStringLower(hash.GetHashAndReset());
            chunks = chunker!.Finish();
            if (actual != sha)
            {
                await retry.RunAsync($"discard the staged bytes of {key}", c => blobs.DeleteAsync(key, c), ct);
                throw new RpcException(new Status(StatusCode.DataLoss, $"{fileName}: the {total} bytes received hash to {actual}, not the announced {sha}; the upload was discarded"));
            }
            await RefuseChunkMismatchAsync(announced, chunks, key, fileName, total, "received", ct);
            // The chunk list first, the file (with the list's hash in its metadata) last: a file the store calls complete has its list.
            await chunkRecords.PutListAsync(key, chunks, ct);
            var metadata = new Dictionary<string, string> { [ShaKey] = sha, [ChunkHashes.MetadataKey] = ChunkHashes.Digest(chunks.Serialize()) };
            await retry.RunAsync($"commit {key}", c => blobs.CommitStagedAsync(key, sha, total, metadata, c), ct);
        }
        else
        {
            await retry.RunAsync($"commit {key}", c => blobs.CommitStagedAsync(key, sha, total, NoMetadata, c), ct);
            (string actual, chunks) = await chunkRecords.HashBlobAsync(key, total, chunkBytes, ct);
            if (actual != sha)
            {
                await retry.RunAsync($"delete {key}", c => blobs.DeleteAsync(key, c), ct);
                throw new RpcException(new Status(StatusCode.DataLoss, $"{fileName}: the {total} bytes stored hash to {actual}, not the announced {sha}; the upload was discarded"));
            }
            await RefuseChunkMismatchAsync(announced, chunks, key, fileName, total, "stored", ct);
            await chunkRecords.RecordAsync(key, chunks, new Dictionary<string, string> { [ShaKey] = sha }, ct);
        }
        logger.LogInformation("Stored {Key} ({Bytes} bytes, {Chunks} chunk hashes)", key, total, chunks.Hashes.Count);
        return Reply(fileName, total, sha, chunks);
    }

    private static UploadShardReply Reply(string fileName, long size, string sha, ChunkHashes chunks)
    {
        var reply = new UploadShardReply { FileName = fileName, Size = size, Sha256 = sha, ChunkBytes = chunks.ChunkBytes };
        reply.ChunkXxh128.AddRange(chunks.Hashes);
        return reply;
    }

    /// <summary>A chunk the uploader hashed otherwise than the store: the new bytes are discarded (a file stored before is kept) and the chunk named.</summary>
    private async Task RefuseChunkMismatchAsync(ChunkHashes? announced, ChunkHashes actual, string key, string fileName, long total, string how, CancellationToken ct,
        bool discard = true)
    {
        if (announced is null || announced.FirstDifference(actual) is not (>= 0 and var k)) return;
        if (discard) await retry.RunAsync($"discard {key}", c => blobs.DeleteAsync(key, c), ct);
        var (start, end) = announced.Range(k, total);
        throw new RpcException(new Status(StatusCode.DataLoss,
            $"{fileName}: bytes [{start}, {end}) (chunk {k} of {announced.Hashes.Count}) {how} hash to {actual.Hashes[k]} (XXH128), not the announced {announced.Hashes[k]}; {(discard ? "the upload was discarded" : "the stored file is kept")}"));
    }

    private async Task RefuseIfCommittedAsync(string job, long step, string fileName, CancellationToken ct)
    {
        string manifest = Manifest(job, step);
        if (await retry.RunAsync($"read the properties of {manifest}", c => blobs.GetInfoAsync(manifest, c), ct) is not null)
            throw Refused($"step {step} of job '{job}' is already committed; {fileName} cannot be written into it");
    }

    // ---- Commit ----

    public override async Task<CommitCheckpointReply> CommitCheckpoint(CommitCheckpointRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string job = Job(request.Job);
        long step = Step(request.Step);
        if (request.Files.Count == 0) throw Invalid($"the commit of step {step} lists no files");
        var files = new List<ExpectedFile>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var f in request.Files)
        {
            if (!names.Add(FileName(f.FileName))) throw Invalid($"{f.FileName} is listed twice");
            Sha256(f.Sha256, $"{f.FileName}'s");
            if (f.Size < 0) throw Invalid($"{f.FileName} has negative size {f.Size}");
            ChunkHashes.Announced(f.ChunkBytes, f.ChunkXxh128, f.Size, f.FileName);
            files.Add(f);
        }
        files.Sort((a, b) => string.CompareOrdinal(a.FileName, b.FileName));
        JsonObject manifest = CommitManifest.Build(request, job, step, files);
        string manifestKey = Manifest(job, step);

        var previous = await ReadManifestAsync(manifestKey, ct);
        if (previous is not null) return CommitManifest.SameCommitOrRefuse(previous, request.Generation, files, job, step, manifestKey);

        var chunkLists = new Dictionary<string, ChunkHashes>(StringComparer.Ordinal);
        foreach (var f in files)
        {
            string key = File(job, step, f.FileName);
            var info = await retry.RunAsync($"read the properties of {key}", c => blobs.GetInfoAsync(key, c), ct)
                ?? throw Refused($"step {step} of job '{job}' cannot be committed: {f.FileName} is missing");
            if (info.Size != f.Size)
                throw Refused($"step {step} of job '{job}' cannot be committed: {f.FileName} is {info.Size} bytes, expected {f.Size}");
            string? stored = info.Metadata.GetValueOrDefault(ShaKey);
            if (stored != f.Sha256)
                throw Refused($"step {step} of job '{job}' cannot be committed: {f.FileName} has SHA-256 {stored ?? "(not verified)"}, expected {f.Sha256}");
            // The chunk hashes the store verified at upload go into the manifest (a committer need not know them; if it
            // names some, they must be those). A file stored before chunk hashes existed commits without them.
            var recorded = await chunkRecords.ReadAsync(key, info, ct);
            if (ChunkHashes.Announced(f.ChunkBytes, f.ChunkXxh128, f.Size, f.FileName) is { } expected && (recorded is null || !expected.SameAs(recorded)))
                throw Refused($"step {step} of job '{job}' cannot be committed: the chunk hashes of {f.FileName} are not those the store verified " +
                    $"({(recorded is null ? "it recorded none" : $"{recorded.Hashes.Count} chunks of {recorded.ChunkBytes} bytes")}); upload it again");
            if (recorded is not null) chunkLists[f.FileName] = recorded;
        }
        foreach (var entry in manifest["files"]!.AsArray())
            if (chunkLists.TryGetValue(entry!["name"]!.GetValue<string>(), out var chunks))
            {
                entry["chunk_bytes"] = chunks.ChunkBytes;
                entry["chunk_xxh128"] = new JsonArray(chunks.Hashes.Select(h => (JsonNode)JsonValue.Create(h)!).ToArray());
            }

        byte[] bytes = JsonSerializer.SerializeToUtf8Bytes(manifest, new JsonSerializerOptions { WriteIndented = true });
        bool written = await retry.RunAsync($"write {manifestKey}", c => blobs.PutAsync(manifestKey, bytes, NoMetadata, onlyIfAbsent: true, c), ct);
        if (!written)
        {
            // Another writer committed between our check and our write: only an identical commit is accepted.
            var winner = await ReadManifestAsync(manifestKey, ct) ?? throw Refused($"{manifestKey} vanished during the commit");
            return CommitManifest.SameCommitOrRefuse(winner, request.Generation, files, job, step, manifestKey);
        }
        logger.LogInformation("Committed step {Step} of job {Job} (generation {Generation}, {Files} files)", step, job, request.Generation, files.Count);
        return new CommitCheckpointReply { ManifestPath = manifestKey };
    }

    private async Task<JsonObject?> ReadManifestAsync(string manifestKey, CancellationToken ct)
    {
        var info = await retry.RunAsync($"read the properties of {manifestKey}", c => blobs.GetInfoAsync(manifestKey, c), ct);
        if (info is null) return null;
        byte[] bytes = new byte[info.Size];
        try { await retry.RunAsync($"read {manifestKey}", c => blobs.ReadAsync(manifestKey, 0, bytes, c), ct); }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // Retention deleted the step between the two calls: it is not committed any more, which is not a storage fault.
            if (await blobs.GetInfoAsync(manifestKey, ct) is null) return null;
            throw;
        }
        return JsonNode.Parse(bytes) as JsonObject ?? throw new RpcException(new Status(StatusCode.DataLoss, $"{manifestKey} is not a JSON object"));
    }

    // ---- Read ----

    public override async Task<ListCheckpointsReply> ListCheckpoints(ListCheckpointsRequest request, ServerCallContext context)
    {
        string job = Job(request.Job);
        var ct = context.CancellationToken;
        var reply = new ListCheckpointsReply();
        foreach (long step in await CommittedStepsAsync(job, ct))
        {
            var manifest = await ReadManifestAsync(Manifest(job, step), ct);
            if (manifest is null) continue; // deleted by retention meanwhile
            var (generation, files) = CommitManifest.Summary(manifest);
            reply.Checkpoints.Add(new CheckpointSummary { Step = step, Generation = generation, FileCount = files.Count, TotalBytes = files.Sum(f => f.Size) });
        }
        return reply;
    }

    public override async Task<GetManifestReply> GetManifest(GetManifestRequest request, ServerCallContext context)
    {
        string job = Job(request.Job);
        long step = Step(request.Step);
        var manifest = await ReadManifestAsync(Manifest(job, step), context.CancellationToken)
            ?? throw NotFound($"step {step} of job '{job}' is not committed (it has no {ManifestName})");
        return new GetManifestReply { ManifestJson = manifest.ToJsonString() };
    }

    public override async Task DownloadTensor(DownloadTensorRequest request, IServerStreamWriter<TensorChunk> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string job = Job(request.Job);
        long step = Step(request.Step);
        if (string.IsNullOrEmpty(request.TensorName)) throw Invalid("tensor_name is empty");
        var manifest = await ReadManifestAsync(Manifest(job, step), ct)
            ?? throw NotFound($"step {step} of job '{job}' is not committed (it has no {ManifestName})");
        var files = CommitManifest.Summary(manifest).Files;
        if (!string.IsNullOrEmpty(request.FileName))
        {
            files = files.Where(f => f.Name == request.FileName).ToList();
            if (files.Count == 0) throw NotFound($"{request.FileName} is not a file of step {step} of job '{job}'");
        }

        string? fileName = null;
        TensorLocation? location = null;
        Func<long, Memory<byte>, Task>? read = null;
        foreach (var f in files)
        {
            read = Reader(manifest, job, step, f.Name, f.Size, ct);
            location = await SafeTensorsHeader.FindAsync(read, f.Name, f.Size, request.TensorName);
            if (location is not null) { fileName = f.Name; break; }
        }
        if (location is null || fileName is null)
            throw NotFound($"tensor '{request.TensorName}' is in no file of step {step} of job '{job}' ({string.Join(", ", files.Select(f => f.Name))})");

        long begin = location.Begin, count = location.End - location.Begin, rowStart = 0, rowCount = location.Shape.Length == 0 ? 1 : location.Shape[0];
        if (request.HasRows)
        {
            if (location.Shape.Length == 0) throw Invalid($"tensor '{request.TensorName}' is a scalar; it has no rows to slice");
            long rows = location.Shape[0];
            if (request.RowStart < 0 || request.RowCount < 0 || request.RowStart > rows - request.RowCount)
                throw new RpcException(new Status(StatusCode.OutOfRange, $"rows [{request.RowStart}, {request.RowStart + request.RowCount}) are outside tensor '{request.TensorName}', which has {rows} rows"));
            long rowBytes = rows == 0 ? 0 : count / rows; // row-major: the rows of dim 0 are contiguous
            (rowStart, rowCount) = (request.RowStart, request.RowCount);
            begin += rowStart * rowBytes;
            count = rowCount * rowBytes;
        }

        var description = new TensorDescription { FileName = fileName, Dtype = location.Dtype, RowStart = rowStart, RowCount = rowCount, ByteCount = count };
        description.Shape.AddRange(location.Shape);
        await responseStream.WriteAsync(new TensorChunk { Description = description }, ct);

        byte[] buffer = new byte[Math.Min(count, DownloadChunkBytes)];
        for (long at = 0; at < count; at += buffer.Length)
        {
            var part = buffer.AsMemory(0, (int)Math.Min(buffer.Length, count - at));
            await read!(begin + at, part);
            await responseStream.WriteAsync(new TensorChunk { Data = ByteString.CopyFrom(part.Span) }, ct);
        }
    }

    /// <summary>
    /// Reads bytes of a committed file. Where the manifest records the file's chunk hashes, every byte served (the header
    /// too) comes from a whole chunk whose XXH128 matched; a mismatch is refused with DataLoss naming the file, the chunk
    /// and its byte range. A file committed without chunk hashes is read as stored.
    /// </summary>
    private Func<long, Memory<byte>, Task> Reader(JsonObject manifest, string job, long step, string fileName, long size, CancellationToken ct)
    {
        string key = File(job, step, fileName);
        var entry = (manifest["files"] as JsonArray ?? []).FirstOrDefault(f => f?["name"]?.GetValue<string>() == fileName);
        if (entry?["chunk_bytes"]?.GetValue<long>() is not long chunkBytes || entry["chunk_xxh128"] is not JsonArray list)
            return (offset, buffer) => retry.RunAsync($"read {key} at {offset}", c => blobs.ReadAsync(key, offset, buffer, c), ct);
        var hashes = list.Select(h => h!.GetValue<string>()).ToList();
        if (chunkBytes < 1 || chunkBytes > ChunkHashes.MaxChunkBytes || hashes.Count != ChunkHashes.Count(size, chunkBytes))
            throw new RpcException(new Status(StatusCode.DataLoss, $"{Manifest(job, step)} lists {hashes.Count} chunk hashes of {chunkBytes} bytes for {fileName} of {size} bytes"));

        Task<byte[]> VerifiedChunkAsync(int k) => verified.GetOrLoadAsync($"{key}#{k}#{hashes[k]}", async () =>
        {
            long start = k * chunkBytes, end = Math.Min(start + chunkBytes, size);
            byte[] bytes = new byte[end - start];
            await retry.RunAsync($"read {key} at {start}", c => blobs.ReadAsync(key, start, bytes, c), ct);
            string actual = Convert.ToHexStringLower(System.IO.Hashing.XxHash128.Hash(bytes));
            if (actual != hashes[k])
            {
                logger.LogError("{Key}: bytes [{Start}, {End}) (chunk {Chunk}) hash to {Actual}, the manifest says {Expected}", key, start, end, k, actual, hashes[k]);
                throw new RpcException(new Status(StatusCode.DataLoss,
                    $"{fileName} of step {step} of job '{job}': bytes [{start}, {end}) (chunk {k} of {hashes.Count}) hash to {actual} (XXH128), the manifest says {hashes[k]}; the stored file is damaged"));
            }
            return bytes;
        }, ct);

        return async (offset, buffer) =>
        {
            if (offset < 0 || offset + buffer.Length > size) throw new EndOfStreamException($"{key}: bytes [{offset}, {offset + buffer.Length}) are outside its {size} bytes");
            for (long at = offset, end = offset + buffer.Length; at < end;)
            {
                int k = (int)(at / chunkBytes);
                byte[] chunk = await VerifiedChunkAsync(k);
                int from = (int)(at - k * chunkBytes), n = (int)Math.Min(chunk.Length - from, end - at);
                chunk.AsSpan(from, n).CopyTo(buffer.Span[(int)(at - offset)..]);
                at += n;
            }
        };
    }

    // ---- Retention ----

    public override async Task<ApplyRetentionReply> ApplyRetention(ApplyRetentionRequest request, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        string job = Job(request.Job);
        if (request.KeepLast < 1) throw Invalid($"keep_last is {request.KeepLast}; at least the newest checkpoint must be kept");
        if (request.KeepEvery < 0) throw Invalid($"keep_every is {request.KeepEvery}; expected 0 (off) or a positive step interval");

        var entries = await retry.RunAsync($"list {job}/", c => blobs.ListAsync(job + "/", includeStaged: true, c), ct);
        var byStep = entries
            .Select(e => (Step: StepOf(job, e.Key), e.Key))
            .Where(e => e.Step is not null)
            .GroupBy(e => e.Step!.Value, e => e.Key)
            .ToDictionary(g => g.Key, g => g.Distinct().ToList());
        var committed = byStep.Where(kv => kv.Value.Contains(Manifest(job, kv.Key))).Select(kv => kv.Key).Order().ToList();

        var reply = new ApplyRetentionReply();
        if (committed.Count == 0) return reply; // nothing committed: every folder may still be an upload in progress
        var keep = committed.TakeLast(request.KeepLast).ToHashSet();
        if (request.KeepEvery > 0) keep.UnionWith(committed.Where(s => s % request.KeepEvery == 0));
        keep.UnionWith(request.KeepSteps);
        long newest = committed[^1];

        foreach (long step in committed)
        {
            if (keep.Contains(step)) { reply.KeptSteps.Add(step); continue; }
            // The manifest goes first: from that moment the step is invisible, whatever happens to the rest.
            string manifest = Manifest(job, step);
            await retry.RunAsync($"delete {manifest}", c => blobs.DeleteAsync(manifest, c), ct);
            foreach (string key in byStep[step].Where(k => k != manifest))
                await retry.RunAsync($"delete {key}", c => blobs.DeleteAsync(key, c), ct);
            reply.DeletedSteps.Add(step);
        }
        foreach (var (step, keys) in byStep.Where(kv => kv.Key < newest && !committed.Contains(kv.Key) && !keep.Contains(kv.Key)).OrderBy(kv => kv.Key))
        {
            foreach (string key in keys)
                await retry.RunAsync($"delete {key}", c => blobs.DeleteAsync(key, c), ct);
            reply.DeletedUncommittedSteps.Add(step);
        }
        logger.LogInformation("Retention for job {Job}: kept {Kept}, deleted {Deleted} committed and {Leftovers} uncommitted steps",
            job, reply.KeptSteps.Count, reply.DeletedSteps.Count, reply.DeletedUncommittedSteps.Count);
        return reply;
    }

    private async Task<List<long>> CommittedStepsAsync(string job, CancellationToken ct)
    {
        var entries = await retry.RunAsync($"list {job}/", c => blobs.ListAsync(job + "/", includeStaged: false, c), ct);
        return entries
            .Select(e => (Step: StepOf(job, e.Key), e.Key))
            .Where(e => e.Step is long s && e.Key == Manifest(job, s))
            .Select(e => e.Step!.Value)
            .Order()
            .ToList();
    }
}
