// A job's checkpoints in the CheckpointStore service: ranks stage their file locally and upload it (resumably); loaders read
// manifests and tensor row ranges back over gRPC. Not a cache: every read goes to the store.
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Training.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using static TorchSharp.torch;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>How uploads are cut and retried.</summary>
public sealed record GrpcCheckpointStoreOptions
{
    /// <summary>Bytes per UploadChunk message: big enough that per-message cost vanishes, far below the store's 16 MiB limit.</summary>
    public int ChunkBytes { get; init; } = 1 << 20;

    /// <summary>Attempts per upload (each resumes where the store's bytes end) before the error is thrown.</summary>
    public int Attempts { get; init; } = 5;

    /// <summary>Wait before the second attempt; doubled for each one after (0.5, 1, 2, 4 s by default).</summary>
    public TimeSpan RetryBaseDelay { get; init; } = TimeSpan.FromMilliseconds(500);

    /// <summary>False: the staged file is deleted once the store holds it (a rank file can be gigabytes).</summary>
    public bool KeepStagedFiles { get; init; }

    /// <summary>
    /// The longest the store may go without a sign of progress in one call: an answer to a unary call, a message of a
    /// download, a chunk of an upload taken in. A call without one for this long is given up with an error naming the
    /// store and what it was asked (an upload counts it as a failed attempt); not a bound on a transfer's length.
    /// </summary>
    public TimeSpan SilenceTimeout { get; init; } = CallSilence.DefaultTimeout;
}

/// <summary>
/// <see cref="ICheckpointSink"/> and <see cref="ICheckpointSource"/> for one job over the CheckpointStore gRPC service.
/// A rank writes <c>{stagingDir}/{job}/{step:D8}/rank-{r}.safetensors</c>; <see cref="PublishAsync"/> uploads it.
/// <see cref="CommitAsync"/> is for tests and single-process runs: in the cluster the Coordinator commits, from the
/// ranks' reports and rank 0's <see cref="ManifestJsonForReport"/>.
/// </summary>
public sealed class GrpcCheckpointStore(Store.CheckpointStoreClient client, string address, string job, string stagingDir,
    GrpcCheckpointStoreOptions? options = null, ILogger<GrpcCheckpointStore>? logger = null) : ICheckpointSink, ICheckpointSource
{
    readonly GrpcCheckpointStoreOptions options = options ?? new();
    readonly ILogger logger = logger ?? NullLogger<GrpcCheckpointStore>.Instance;

    /// <summary>
    /// Rank files record an XXH128 per chunk of this many bytes (null: none); the upload announces them, the store
    /// verifies them against the bytes it receives, puts them in the manifest and checks every chunk it serves.
    /// </summary>
    public long? HashChunkBytes { get; init; } = ManifestFile.DefaultChunkBytes;

    /// <summary>The same service's exports (a run's final model goes there); null where only checkpoints are wanted.</summary>
    public GrpcExportStore? Exports { get; init; }

    /// <summary>The store's address, for error messages.</summary>
    public string Address => address;

    public string LocalPath(long step, int rank) => Path.Combine(stagingDir, job, $"{step:D8}", ShardingPlan.FileOf(rank));

    // ---- Upload ----

    public async Task<ManifestFile> PublishAsync(long step, int rank, ManifestFile written, CancellationToken ct = default)
    {
        string path = LocalPath(step, rank), name = Path.GetFileName(path);
        if (written.Name != name) throw new ArgumentException($"rank {rank} wrote '{written.Name}', but its file is '{name}'", nameof(written));
        RpcException? last = null;
        for (int attempt = 1; attempt <= options.Attempts; attempt++)
        {
            if (attempt > 1)
            {
                var delay = options.RetryBaseDelay * Math.Pow(2, attempt - 2);
                logger.LogWarning("Upload of {File} (step {Step}) to {Address} failed ({Status}: {Detail}); attempt {Attempt} of {Attempts} in {Delay} ms",
                    name, step, address, last!.StatusCode, last.Status.Detail, attempt, options.Attempts, delay.TotalMilliseconds);
                await Task.Delay(delay, ct);
            }
            try
            {
                var stored = await UploadOnceAsync(step, rank, path, written, ct);
                if (stored.Size != written.Size || stored.Sha256 != written.Sha256
                    || written.ChunkXxh128 is { } mine && stored.ChunkXxh128 is { } theirs && !mine.SequenceEqual(theirs))
                    throw new InvalidDataException($"the checkpoint store at {address} holds {stored.Name} of step {step} as {stored.Size} bytes, {stored.Sha256}; " +
                        $"this rank wrote {written.Size} bytes, {written.Sha256}");
                if (!options.KeepStagedFiles) File.Delete(path);
                return stored;
            }
            catch (RpcException e) when (ct.IsCancellationRequested)
            {
                throw new OperationCanceledException($"the upload of {name} (step {step}) was cancelled", e, ct);
            }
            catch (RpcException e) when (IsTransient(e.StatusCode))
            {
                last = e;
            }
            catch (RpcException e)
            {
                throw new IOException($"the checkpoint store at {address} refused {name} of step {step} of job '{job}': {e.Status.Detail} ({e.StatusCode})", e);
            }
        }
        throw new IOException($"could not upload {name} of step {step} of job '{job}' to the checkpoint store at {address}: " +
            $"{options.Attempts} attempts failed, the last with {last!.StatusCode}: {last.Status.Detail}", last);
    }

    /// <summary>
    /// Unavailable and the like: the connection or the storage behind it. FailedPrecondition: the store holds other
    /// bytes than the stream assumed (a chunk at the wrong offset, a stream that ended early); the next attempt asks again.
    /// </summary>
    static bool IsTransient(StatusCode code) =>
        code is StatusCode.Unavailable or StatusCode.DeadlineExceeded or StatusCode.Aborted or StatusCode.Internal
            or StatusCode.ResourceExhausted or StatusCode.Unknown or StatusCode.Cancelled or StatusCode.FailedPrecondition;

    /// <summary>
    /// One attempt. A store that takes nothing in (its reads stopped: the writes wait on HTTP/2 flow control) or never
    /// answers for <see cref="GrpcCheckpointStoreOptions.SilenceTimeout"/> fails the attempt as DeadlineExceeded, which the
    /// caller retries: without it the final checkpoint's upload, and the run's end that waits for it, could wait forever.
    /// </summary>
    async Task<ManifestFile> UploadOnceAsync(long step, int rank, string path, ManifestFile written, CancellationToken ct)
    {
        using var silence = new CallSilence(options.SilenceTimeout, ct);
        try { return await UploadOnceAsync(step, rank, path, written, silence, ct); }
        catch (Exception e) when (silence.Ended(e))
        {
            throw new RpcException(new Status(StatusCode.DeadlineExceeded,
                $"the checkpoint store at {address} {silence.Verb} nothing for {options.SilenceTimeout.TotalSeconds:0.#} s " +
                $"during the upload of {written.Name} of step {step}"));
        }
    }

    async Task<ManifestFile> UploadOnceAsync(long step, int rank, string path, ManifestFile written, CallSilence silence, CancellationToken ct)
    {
        var status = await client.GetUploadStatusAsync(new UploadStatusRequest { Job = job, Step = step, FileName = written.Name, Sha256 = written.Sha256 },
            cancellationToken: silence.Token);
        silence.Progress();
        if (status.Complete) return written with { Size = status.ReceivedBytes };

        long from = status.ReceivedBytes;
        if (from > 0) logger.LogInformation("Resuming the upload of {File} (step {Step}) at byte {Offset} of {Size}", written.Name, step, from, written.Size);
        await using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0, FileOptions.SequentialScan);
        if (file.Length != written.Size)
            throw new InvalidDataException($"{path} is {file.Length} bytes, but its writer reported {written.Size}");

        using var call = client.UploadShard(cancellationToken: silence.Token);
        silence.Uploading = true;
        var header = new UploadHeader { Job = job, Step = step, Rank = rank, FileName = written.Name, TotalSize = written.Size, Sha256 = written.Sha256 };
        if (written.ChunkXxh128 is { } chunks)
        {
            header.ChunkBytes = written.ChunkBytes!.Value;
            header.ChunkXxh128.AddRange(chunks);
        }
        bool open = await SendAsync(() => call.RequestStream.WriteAsync(new UploadShardMessage { Header = header }, silence.Token));
        file.Position = from;
        byte[] buffer = new byte[(int)Math.Min(options.ChunkBytes, Math.Max(1, written.Size))];
        for (long at = from; open && at < written.Size;)
        {
            int n = await file.ReadAtLeastAsync(buffer, (int)Math.Min(buffer.Length, written.Size - at), throwOnEndOfStream: true, ct);
            long offset = at;
            open = await SendAsync(() => call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = offset, Data = ByteString.CopyFrom(buffer, 0, n) } }, silence.Token));
            silence.Progress();
            at += n;
        }
        if (open) await SendAsync(call.RequestStream.CompleteAsync);
        silence.Uploading = false;
        silence.Progress(); // from here the store checks and stores what it took in, then answers
        var reply = await call.ResponseAsync;
        return new ManifestFile(reply.FileName, reply.Size, reply.Sha256)
        {
            ChunkBytes = reply.ChunkBytes > 0 ? reply.ChunkBytes : null,
            ChunkXxh128 = reply.ChunkBytes > 0 ? [.. reply.ChunkXxh128] : null,
        };
    }

    /// <summary>
    /// False when the call ended while we were writing (a refusal, a dropped connection): its status is the response's.
    /// Only the write is guarded; a local read error leaves the call, whose disposal cancels it.
    /// </summary>
    static async Task<bool> SendAsync(Func<Task> write)
    {
        try
        {
            await write();
            return true;
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException or IOException) { return false; }
    }

    // ---- Commit ----

    public async Task CommitAsync(CheckpointManifest manifest, CancellationToken ct = default)
    {
        if (manifest.Job != job) throw new ArgumentException($"the manifest is for job '{manifest.Job}', this store holds job '{job}'", nameof(manifest));
        var request = new CommitCheckpointRequest { Job = job, Step = manifest.Step, Generation = manifest.Generation, ManifestJson = WithoutStoreFields(manifest.ToJson()) };
        request.Files.AddRange(manifest.Files.Select(f =>
        {
            var expected = new ExpectedFile { FileName = f.Name, Size = f.Size, Sha256 = f.Sha256 };
            if (f.ChunkXxh128 is { } chunks) { expected.ChunkBytes = f.ChunkBytes!.Value; expected.ChunkXxh128.AddRange(chunks); }
            return expected;
        }));
        try { await client.CommitCheckpointAsync(request, cancellationToken: ct); }
        catch (RpcException e) when (!ct.IsCancellationRequested)
        {
            throw new InvalidOperationException($"the checkpoint store at {address} did not commit step {manifest.Step} of job '{job}': {e.Status.Detail} ({e.StatusCode})", e);
        }
    }

    /// <summary>
    /// What rank 0 sends in its CheckpointReport.manifest_json: the manifest of the whole step without "files" and
    /// "committed_utc", which the store fills in from the Coordinator's list of reported files.
    /// </summary>
    /// <param name="guard">The step guard's state at the checkpoint's step, kept under <see cref="GuardState.ManifestKey"/> (the store keeps a committer's own fields).</param>
    public static string ManifestJsonForReport(string job, ShardingPlan plan, CheckpointPosition position, string? configJson, string? tokenizerSha256,
                                               GuardState? guard = null)
    {
        // Every rank's file is named so the manifest validates; sizes and hashes are the Coordinator's to give.
        var placeholders = Enumerable.Range(0, plan.Layout.WorldSize).Select(r => new ManifestFile(ShardingPlan.FileOf(r), 0, ""));
        string json = WithoutStoreFields(ShardedCheckpointWriter.Manifest(job, plan, position, placeholders, configJson, tokenizerSha256).ToJson());
        if (guard is null) return json;
        var node = JsonNode.Parse(json)!.AsObject();
        node[GuardState.ManifestKey] = guard.ToJson();
        return node.ToJsonString();
    }

    /// <summary>The step guard's state committed with step <paramref name="step"/>; null for a checkpoint saved without one.</summary>
    public async Task<GuardState?> ReadGuardStateAsync(long step, CancellationToken ct = default)
    {
        var reply = await Call($"read the manifest of step {step}",
            silence => client.GetManifestAsync(new GetManifestRequest { Job = job, Step = step }, cancellationToken: silence.Token).ResponseAsync, ct);
        string source = $"{address}: manifest of step {step} of job '{job}'";
        var node = JsonNode.Parse(reply.ManifestJson) ?? throw new InvalidDataException($"{source} is empty");
        return node[GuardState.ManifestKey] is { } guard ? GuardState.FromJson(guard, source) : null;
    }

    static string WithoutStoreFields(string manifestJson)
    {
        var node = JsonNode.Parse(manifestJson)!.AsObject();
        node.Remove("files");
        node.Remove("committed_utc");
        return node.ToJsonString();
    }

    // ---- Read ----

    public async Task<IReadOnlyList<long>> ListStepsAsync(CancellationToken ct = default)
    {
        var reply = await Call("list the checkpoints", silence => client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job }, cancellationToken: silence.Token).ResponseAsync, ct);
        return [.. reply.Checkpoints.Select(c => c.Step).Order()];
    }

    public async Task<CheckpointManifest> ReadManifestAsync(long step, CancellationToken ct = default)
    {
        var reply = await Call($"read the manifest of step {step}",
            silence => client.GetManifestAsync(new GetManifestRequest { Job = job, Step = step }, cancellationToken: silence.Token).ResponseAsync, ct);
        return CheckpointManifest.FromJson(reply.ManifestJson, $"{address}: manifest of step {step} of job '{job}'");
    }

    public Task<Tensor> ReadAsync(long step, string file, string tensor, (long Start, long Count)? rows, CancellationToken ct = default)
    {
        var request = new DownloadTensorRequest { Job = job, Step = step, TensorName = tensor, FileName = file };
        if (rows is { } r) (request.HasRows, request.RowStart, request.RowCount) = (true, r.Start, r.Count);
        return Call($"download '{tensor}' of {file}, step {step}", silence => DownloadAsync(request, silence), ct);
    }

    /// <summary>A tensor's bytes as the store streams them; each message that comes restarts the silence bound.</summary>
    async Task<Tensor> DownloadAsync(DownloadTensorRequest request, CallSilence silence)
    {
        using var call = client.DownloadTensor(request, cancellationToken: silence.Token);
        Tensor? result = null;
        TensorFill? fill = null;
        try
        {
            await foreach (var chunk in call.ResponseStream.ReadAllAsync(silence.Token))
            {
                silence.Progress();
                if (chunk.Description is { } d)
                {
                    var (type, itemSize) = Dtypes.Of(d.Dtype, request.TensorName);
                    long[] shape = d.Shape.Count == 0 ? [] : [d.RowCount, .. d.Shape.Skip(1)];
                    result = empty(shape, type);
                    if (result.numel() * itemSize != d.ByteCount)
                        throw new InvalidDataException($"{address} announced {d.ByteCount} bytes for '{request.TensorName}' of shape [{string.Join(", ", shape)}] {d.Dtype}");
                    fill = new TensorFill(result, itemSize);
                }
                if (chunk.Data.Length == 0) continue;
                (fill ?? throw new InvalidDataException($"{address} sent bytes of '{request.TensorName}' before its description")).Append(chunk.Data.Span);
            }
            if (result is null || fill is null) throw new InvalidDataException($"{address} sent no description of '{request.TensorName}'");
            if (fill.Written != result.numel() * fill.ItemSize)
                throw new InvalidDataException($"{address} sent {fill.Written} bytes of '{request.TensorName}', expected {result.numel() * fill.ItemSize}");
            return result;
        }
        catch
        {
            result?.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Runs a read; a gRPC failure becomes an exception naming the store, the job and what was asked, and so does a store
    /// that sends nothing for <see cref="GrpcCheckpointStoreOptions.SilenceTimeout"/> (a call without a deadline would wait
    /// for it forever, and rank 0's end, which loads the whole model after the job's Stop, has no other way out).
    /// </summary>
    async Task<T> Call<T>(string what, Func<CallSilence, Task<T>> call, CancellationToken ct)
    {
        using var silence = new CallSilence(options.SilenceTimeout, ct);
        try { return await call(silence); }
        catch (Exception e) when (silence.Ended(e))
        {
            throw new IOException($"could not {what} of job '{job}' from the checkpoint store at {address}: it sent nothing for {options.SilenceTimeout.TotalSeconds:0.#} s", e);
        }
        catch (RpcException e) when (!ct.IsCancellationRequested)
        {
            string message = $"could not {what} of job '{job}' from the checkpoint store at {address}: {e.Status.Detail} ({e.StatusCode})";
            throw e.StatusCode == StatusCode.NotFound ? new FileNotFoundException(message, e) : new IOException(message, e);
        }
    }

    /// <summary>Writes streamed bytes into a contiguous CPU tensor in order, a window of whole elements at a time.</summary>
    sealed class TensorFill(Tensor target, int itemSize)
    {
        public int ItemSize => itemSize;
        public long Written { get; private set; }

        public void Append(ReadOnlySpan<byte> data)
        {
            long total = target.numel() * itemSize;
            if (Written + data.Length > total) throw new InvalidDataException($"the store sent more than the {total} bytes it announced");
            // A window of whole elements covering [Written, Written + data.Length); spans stay far below 2 GiB.
            long first = Written / itemSize, end = (Written + data.Length + itemSize - 1) / itemSize;
            using var flat = target.view(-1);
            using var window = flat.narrow(0, first, end - first);
            data.CopyTo(window.bytes[(int)(Written - first * itemSize)..]);
            Written += data.Length;
        }
    }

    /// <summary>The safetensors dtype names the store reports (Training keeps its own table internal).</summary>
    static class Dtypes
    {
        static readonly Dictionary<string, (ScalarType Type, int ItemSize)> Table = new(StringComparer.Ordinal)
        {
            ["BOOL"] = (ScalarType.Bool, 1), ["U8"] = (ScalarType.Byte, 1), ["I8"] = (ScalarType.Int8, 1),
            ["I16"] = (ScalarType.Int16, 2), ["F16"] = (ScalarType.Float16, 2), ["BF16"] = (ScalarType.BFloat16, 2),
            ["I32"] = (ScalarType.Int32, 4), ["F32"] = (ScalarType.Float32, 4), ["F64"] = (ScalarType.Float64, 8), ["I64"] = (ScalarType.Int64, 8),
        };

        public static (ScalarType Type, int ItemSize) Of(string dtype, string tensor) =>
            Table.TryGetValue(dtype, out var e) ? e
                : throw new InvalidDataException($"tensor '{tensor}' has dtype '{dtype}'; expected one of {string.Join(", ", Table.Keys)}");
    }
}
