// Exports in the CheckpointStore's ExportStore service: upload a local export folder and commit its export.json; download one back.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Training.Export;
using Google.Protobuf;
using Grpc.Core;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <param name="silenceTimeout">
/// The longest a call may go without an answer, a message or a chunk taken in (null: <see cref="CallSilence.DefaultTimeout"/>):
/// rank 0 puts the final model here after the job's Stop, when no cancellation reaches it, so a silent store must end the
/// call with its name rather than hold the run's end for ever.
/// </param>
public sealed class GrpcExportStore(ExportStore.ExportStoreClient client, string address, TimeSpan? silenceTimeout = null)
{
    const int ChunkBytes = 1 << 20;
    readonly TimeSpan silenceTimeout = silenceTimeout ?? CallSilence.DefaultTimeout;

    public static ExportKey KeyOf(ExportManifest m) => new() { Job = m.Job, Step = m.Step, Format = m.Format };

    /// <summary>
    /// Uploads every file <paramref name="manifest"/> lists from <paramref name="folder"/>, then commits: the store checks
    /// each against the manifest and writes export.json last. Returns the key of the committed export.json.
    /// </summary>
    public async Task<string> UploadAsync(string folder, ExportManifest manifest, CancellationToken ct = default)
    {
        var key = KeyOf(manifest);
        string what = "";
        CallSilence? silence = null;
        try
        {
            foreach (var file in manifest.Files)
            {
                what = $"the upload of {file.Path}";
                silence = new CallSilence(silenceTimeout, ct) { Uploading = true };
                using var call = client.UploadExportFile(cancellationToken: silence.Token);
                try
                {
                    await call.RequestStream.WriteAsync(new UploadExportFileMessage
                    {
                        Header = new ExportFileHeader { Export = key, Path = file.Path, TotalSize = file.Bytes, Sha256 = file.Sha256 },
                    }, silence.Token);
                    await using (var stream = File.OpenRead(Path.Combine(folder, file.Path)))
                    {
                        var buffer = new byte[ChunkBytes];
                        int read;
                        while ((read = await stream.ReadAsync(buffer, ct)) > 0)
                        {
                            await call.RequestStream.WriteAsync(new UploadExportFileMessage { Data = ByteString.CopyFrom(buffer, 0, read) }, silence.Token);
                            silence.Progress();
                        }
                    }
                    await call.RequestStream.CompleteAsync();
                }
                catch (RpcException) when (!ct.IsCancellationRequested && !silence.Expired) { } // the store ended the call early: its reason is the response's status
                silence.Uploading = false;
                silence.Progress();
                await call;
                silence.Dispose();
            }
            what = "the commit";
            silence = new CallSilence(silenceTimeout, ct);
            var reply = await client.CommitExportAsync(new CommitExportRequest { Export = key, ManifestJson = manifest.ToJson() }, cancellationToken: silence.Token);
            return reply.ManifestKey;
        }
        catch (Exception e) when (silence is { Expired: true } && e is RpcException or OperationCanceledException)
        {
            throw new IOException($"the export store at {address} {silence.Verb} nothing for {silenceTimeout.TotalSeconds:0.#} s during {what} of {key.Job}/{key.Step}/{key.Format}", e);
        }
        catch (RpcException e)
        {
            throw new IOException($"the export store at {address} refused {key.Job}/{key.Step}/{key.Format}: {e.Status.StatusCode}: {e.Status.Detail}", e);
        }
        finally { silence?.Dispose(); }
    }

    /// <summary>Committed exports of <paramref name="job"/>; a store silent for the silence timeout is an IOException naming it.</summary>
    public async Task<IReadOnlyList<ExportSummary>> ListAsync(string job, CancellationToken ct = default)
    {
        using var silence = new CallSilence(silenceTimeout, ct);
        try { return (await client.ListExportsAsync(new ListExportsRequest { Job = job }, cancellationToken: silence.Token)).Exports; }
        catch (Exception e) when (silence.Ended(e))
        {
            throw new IOException($"the export store at {address} answered nothing for {silenceTimeout.TotalSeconds:0.#} s when asked to list the exports of job '{job}'", e);
        }
    }

    /// <summary>Downloads a committed export into <paramref name="target"/> (created; must not exist) and verifies it.</summary>
    public async Task<ExportManifest> DownloadAsync(ExportKey key, string target, CancellationToken ct = default)
    {
        var summary = (await ListAsync(key.Job, ct)).FirstOrDefault(e => e.Export.Equals(key))
            ?? throw new FileNotFoundException($"the export store at {address} has no committed export {key.Job}/{key.Step}/{key.Format}");
        if (Directory.Exists(target)) throw new IOException($"'{target}' already exists");
        var staging = target + $".partial-{Guid.NewGuid():N}";
        try
        {
            Directory.CreateDirectory(staging);
            File.WriteAllText(Path.Combine(staging, ExportManifest.FileName), summary.ManifestJson);
            var manifest = ExportManifest.Load(Path.Combine(staging, ExportManifest.FileName));
            foreach (var file in manifest.Files)
            {
                var path = Path.Combine(staging, file.Path);
                Directory.CreateDirectory(Path.GetDirectoryName(path)!);
                await using var output = File.Create(path);
                using var call = client.DownloadExportFile(new DownloadExportFileRequest { Export = key, Path = file.Path }, cancellationToken: ct);
                await foreach (var chunk in call.ResponseStream.ReadAllAsync(ct)) chunk.Data.WriteTo(output);
            }
            ModelExport.Verify(staging);
            Directory.Move(staging, target);
            return manifest;
        }
        catch
        {
            if (Directory.Exists(staging)) Directory.Delete(staging, recursive: true);
            throw;
        }
    }
}
