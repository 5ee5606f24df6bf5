// The `prepare` verb: the same pipeline as the gRPC Prepare, from the command line, with progress lines on stdout.
using System.Globalization;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Storage;

namespace DeepSeekCluster.DataShardService.Serving;

public static class PrepareCli
{
    public const string Usage =
        "usage: prepare --source name=path[:weight] [--source ...] (--out DIR | ConnectionStrings__blobs set) --seq-len N " +
        "[--vocab-size N | --tokenizer tokenizer.json] [--text-field F] [--validation-fraction X] [--samples-per-shard N]\n" +
        "Storage is chosen as the service chooses it: with ConnectionStrings__blobs set, datasets go to blob storage " +
        "(container DataShards__Container, default 'datasets'; DataShards__* settings apply); otherwise to the folder --out.";

    /// <summary><paramref name="configuration"/> is what the service would read (environment variables in Program.cs).</summary>
    public static async Task<int> RunAsync(string[] args, IConfiguration configuration, CancellationToken ct)
    {
        PrepareSpec spec;
        string? outDir;
        try
        {
            (spec, outDir) = Parse(args);
        }
        catch (FormatException e)
        {
            Console.Error.WriteLine(e.Message);
            Console.Error.WriteLine(Usage);
            return 2;
        }

        var options = new DataShardsOptions();
        configuration.GetSection(DataShardsOptions.Section).Bind(options);
        options.BlobConnection = configuration.GetConnectionString(ServiceNames.Blobs);
        if (options.UsesBlobStorage && outDir is not null)
        {
            Console.Error.WriteLine($"--out '{outDir}' names a folder store, but ConnectionStrings:blobs is set, so datasets go to blob storage: " +
                                    "leave out --out, or unset ConnectionStrings__blobs to write to the folder.");
            return 2;
        }
        if (!options.UsesBlobStorage)
        {
            if (outDir is null)
            {
                Console.Error.WriteLine("--out DIR is required when ConnectionStrings__blobs is not set.");
                Console.Error.WriteLine(Usage);
                return 2;
            }
            options.Root = outDir;
        }
        if (options.Problem() is { } problem)
        {
            Console.Error.WriteLine($"error: {problem}");
            return 2;
        }

        IDatasetStore store = options.UsesBlobStorage
            ? AzureDatasetStore.Create(options.BlobConnection!, options.Container, options.CacheDir, options.BlockBytes, options.Retry)
            : new FolderDatasetStore(options.Root);
        var preparer = new DatasetPreparer(store, options.WorkDir);
        try
        {
            var progress = new SynchronousProgress(line => Console.WriteLine($"[prepare] {line}"));
            var result = await preparer.PrepareAsync(spec, progress, ct);
            Console.WriteLine($"[prepare] {(result.Reused ? "reused" : "done")}: {result.Manifest.DatasetId} at " +
                              store.Describe($"{result.Manifest.DatasetId}/manifest.json"));
            return 0;
        }
        catch (DataInputException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 1;
        }
    }

    internal static (PrepareSpec Spec, string? OutDir) Parse(string[] args)
    {
        var sources = new List<SourceSpec>();
        string? outDir = null, tokenizer = null, textField = null;
        int seqLen = 0, vocab = 512, perShard = 8192;
        double validation = 0.05;
        for (int i = 0; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new FormatException($"{args[i]} needs a value.");
            switch (args[i])
            {
                case "--source": sources.Add(ParseSource(Value())); break;
                case "--out": outDir = Value(); break;
                case "--seq-len": seqLen = ParseInt("--seq-len", Value()); break;
                case "--vocab-size": vocab = ParseInt("--vocab-size", Value()); break;
                case "--tokenizer": tokenizer = Value(); break;
                case "--text-field": textField = Value(); break;
                case "--samples-per-shard": perShard = ParseInt("--samples-per-shard", Value()); break;
                case "--validation-fraction":
                    string v = Value();
                    validation = double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out double x) ? x
                        : throw new FormatException($"--validation-fraction '{v}' is not a number.");
                    break;
                default: throw new FormatException($"Unknown argument '{args[i]}'.");
            }
        }
        if (sources.Count == 0) throw new FormatException("At least one --source name=path[:weight] is required.");
        if (seqLen == 0) throw new FormatException("--seq-len N is required: the training sequence length in tokens (each stored sample holds N + 1).");
        if (textField is not null) sources = sources.Select(s => s with { TextField = textField }).ToList();
        return (new PrepareSpec(sources, seqLen, vocab, tokenizer, validation, perShard), outDir);
    }

    private static SourceSpec ParseSource(string value)
    {
        int eq = value.IndexOf('=');
        if (eq <= 0) throw new FormatException($"--source '{value}': expected name=path[:weight].");
        string name = value[..eq], path = value[(eq + 1)..];
        double weight = 1;
        int colon = path.LastIndexOf(':');
        if (colon > 0 && double.TryParse(path[(colon + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture, out double w))
        {
            weight = w;
            path = path[..colon];
        }
        return new SourceSpec(name, path, weight);
    }

    private static int ParseInt(string flag, string value) =>
        int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int n) ? n
            : throw new FormatException($"{flag} '{value}' is not an integer.");

    // Progress<T> posts to the thread pool, so lines could print out of order; a CLI wants them at once.
    private sealed class SynchronousProgress(Action<string> report) : IProgress<string>
    {
        public void Report(string value) => report(value);
    }
}
