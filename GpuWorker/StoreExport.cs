// gpu-worker export --store: a committed checkpoint in the CheckpointStore service exported into its ExportStore, or an export downloaded.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Export;
using Grpc.Net.Client;

namespace DeepSeekCluster.GpuWorker;

static class StoreExport
{
    /// <summary>--job and --step (and --format, <paramref name="defaultFormat"/> unless given) of an export in the store at <paramref name="storeUrl"/>.</summary>
    public static (Uri Store, ExportKey Key) ExportOf(CommandLine cl, string storeUrl, string defaultFormat)
    {
        var uri = StoreUri(storeUrl);
        string job = cl.String("job") ?? throw new ArgumentException("option --job NAME is required with --store");
        long step = cl.String("step") is null ? throw new ArgumentException("option --step N is required with --store: the export's step") : cl.Get("step", 0L);
        return (uri, new ExportKey { Job = job, Step = step, Format = ModelExport.CheckFormat(cl.String("format") ?? defaultFormat) });
    }

    /// <summary>
    /// Downloads a committed export into <paramref name="target"/> (which must not exist), checking every file's SHA-256;
    /// with the cluster token from Cluster__Token when it is set (a cluster's store refuses calls without it).
    /// </summary>
    public static ExportManifest Download(Uri store, ExportKey key, string target)
    {
        using var channel = DeepSeekCluster.ServiceDefaults.ClusterChannel.For(store, null, "--store", token: Environment.GetEnvironmentVariable("Cluster__Token") is { Length: > 0 } t ? t : null);
        return new GrpcExportStore(new ExportStore.ExportStoreClient(channel), store.ToString()).DownloadAsync(key, target).GetAwaiter().GetResult();
    }

    static Uri StoreUri(string storeUrl) =>
        Uri.TryCreate(storeUrl, UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https"
            ? uri : throw new ArgumentException($"--store '{storeUrl}' is not an http(s) URL of the CheckpointStore service");

    public static int Run(CommandLine cl, string storeUrl, string format)
    {
        var uri = StoreUri(storeUrl);
        string job = cl.String("job") ?? throw new ArgumentException("option --job NAME is required with --store");
        long? step = cl.String("step") is null ? null : cl.Get("step", 0L);
        bool download = cl.Flag("download");
        using var channel = GrpcChannel.ForAddress(uri);
        var exports = new GrpcExportStore(new ExportStore.ExportStoreClient(channel), storeUrl);
        if (download)
        {
            var outDir = cl.String("out") ?? throw new ArgumentException("option --out DIR is required with --download");
            cl.RejectUnknown();
            var key = new ExportKey { Job = job, Step = step ?? throw new ArgumentException("option --step N is required with --download"), Format = format };
            var manifest = exports.DownloadAsync(key, outDir).GetAwaiter().GetResult();
            Console.WriteLine($"downloaded {job}/{key.Step}/{format} ({manifest.Files.Sum(f => f.Bytes)} bytes in {manifest.Files.Count} files, hashes checked) to {Path.GetFullPath(outDir)}");
            return 0;
        }
        var tokenizerPath = cl.String("tokenizer") ?? throw new ArgumentException("option --tokenizer FILE is required with --store: the tokenizer.json the checkpoint was trained with");
        cl.RejectUnknown();
        var scratch = Directory.CreateTempSubdirectory("gpu-worker-export-").FullName;
        try
        {
            var source = new GrpcCheckpointStore(new CheckpointStore.CheckpointStoreClient(channel), storeUrl, job, scratch);
            var (folder, manifest) = ModelExport.FromCheckpointAsync(source, step, BpeTokenizer.Load(tokenizerPath), format, scratch).GetAwaiter().GetResult();
            string key = exports.UploadAsync(folder, manifest).GetAwaiter().GetResult();
            Console.WriteLine($"exported {manifest.Source} as {format} into the store at {storeUrl}: {key} ({manifest.Files.Sum(f => f.Bytes)} bytes in {manifest.Files.Count} files)");
            return 0;
        }
        finally
        {
            Directory.Delete(scratch, recursive: true);
        }
    }
}
