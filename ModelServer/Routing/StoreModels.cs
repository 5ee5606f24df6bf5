// Models named by their place in the CheckpointStore: an export (exports/{job}/{step}/{format}) or a committed checkpoint
// ({job}/{step}), brought into a local folder with every file's hash checked, then loaded as any folder is (ServedModel).
using System.Globalization;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.ServiceDefaults;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Export;
using Grpc.Core;

namespace DeepSeekCluster.ModelServer.Routing;

/// <summary>A model in the store: an export when <see cref="Format"/> is set, else a committed checkpoint.</summary>
public sealed record StoreModelRef(string Job, long Step, string? Format)
{
    /// <summary>The exports the server can load: Hugging Face folders (GGUF and ONNX are for other runtimes).</summary>
    public static readonly IReadOnlyList<string> ServableFormats = ["hf", "hf-bf16"];

    public bool IsExport => Format is not null;

    public override string ToString() => IsExport ? $"exports/{Job}/{Step}/{Format}" : $"{Job}/{Step}";

    /// <summary>Parses "exports/{job}/{step}/{format}" or "{job}/{step}"; <paramref name="what"/> names the setting in errors.</summary>
    public static StoreModelRef Parse(string? text, string what)
    {
        const string expected = "expected exports/{job}/{step}/{format} (a committed export, format hf or hf-bf16) or {job}/{step} (a committed checkpoint)";
        var parts = (text ?? "").Split('/');
        bool export = parts.Length == 4 && parts[0] == "exports";
        if (!export && parts.Length != 2) throw new ArgumentException($"{what} '{text}': {expected}");
        string job = parts[export ? 1 : 0], stepText = parts[export ? 2 : 1];
        if (job.Length == 0 || job.Contains("..", StringComparison.Ordinal) || job.Any(c => !(char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-')))
            throw new ArgumentException($"{what} '{text}': job '{job}' must be letters, digits, '.', '_' or '-'; {expected}");
        if (!long.TryParse(stepText, NumberStyles.None, CultureInfo.InvariantCulture, out long step))
            throw new ArgumentException($"{what} '{text}': step '{stepText}' must be a non-negative whole number; {expected}");
        string? format = export ? parts[3] : null;
        if (format is not null && !ServableFormats.Contains(format))
            throw new ArgumentException($"{what} '{text}': format '{format}' cannot be served; expected one of {string.Join(", ", ServableFormats)}");
        return new StoreModelRef(job, step, format);
    }
}

/// <summary>Where the store is and how to reach it (Serving:Store, Cluster:Token, Cluster:Tls:*), and the local cache folder.</summary>
public sealed record StoreAccess(Uri Address, string? Token, ClusterTls? Tls, string CacheFolder);

public static class StoreModels
{
    /// <summary>
    /// A local folder holding <paramref name="model"/>: an export is downloaded file by file and checked against its
    /// export.json (sizes and SHA-256) before it is moved into place; a checkpoint is read tensor by tensor with its chunk
    /// hashes checked and the tokenizer's hash compared with the one the checkpoint was saved with, then written as an
    /// hf export. A folder already in the cache is checked against its export.json again, and fetched anew if it differs.
    /// </summary>
    public static async Task<string> FetchAsync(StoreAccess store, StoreModelRef model, string? tokenizerPath, CancellationToken ct = default)
    {
        string format = model.Format ?? "hf";
        string root = Path.Combine(store.CacheFolder, model.IsExport ? "exports" : "checkpoints");
        string target = ModelExport.FolderOf(root, model.Job, model.Step, format);
        if (Directory.Exists(target))
        {
            try { ModelExport.Verify(target); return target; }
            catch (InvalidDataException) { Directory.Delete(target, recursive: true); } // damaged or partial: fetch again
        }
        BpeTokenizer? tokenizer = null;
        if (!model.IsExport)
        {
            if (tokenizerPath is null)
                throw new ArgumentException($"checkpoint {model} needs the tokenizer.json it was trained with (Serving:Models:N:Tokenizer, or 'tokenizer' in /admin/models)");
            tokenizer = BpeTokenizer.Load(tokenizerPath);
        }
        using var channel = ClusterChannel.For(store.Address, store.Tls, "Serving:Store", token: store.Token);
        try
        {
            if (model.IsExport)
                await new GrpcExportStore(new ExportStore.ExportStoreClient(channel), store.Address.ToString())
                    .DownloadAsync(new ExportKey { Job = model.Job, Step = model.Step, Format = format }, target, ct);
            else
            {
                var scratch = Directory.CreateTempSubdirectory("model-server-checkpoint-").FullName;
                try
                {
                    var source = new GrpcCheckpointStore(new CheckpointStore.CheckpointStoreClient(channel), store.Address.ToString(), model.Job, scratch);
                    var (written, _) = await ModelExport.FromCheckpointAsync(source, model.Step, tokenizer!, format, root, ct);
                    if (Path.GetFullPath(written) != Path.GetFullPath(target))
                        throw new InvalidDataException($"checkpoint {model} names job '{Path.GetFileName(Path.GetDirectoryName(Path.GetDirectoryName(written)))}' in its manifest");
                }
                finally { Directory.Delete(scratch, recursive: true); }
            }
        }
        catch (RpcException e)
        {
            throw new IOException($"the CheckpointStore at {store.Address} could not give {model}: {e.Status.StatusCode}: {e.Status.Detail}", e);
        }
        return target;
    }
}
