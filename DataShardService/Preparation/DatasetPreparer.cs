// The prepare pipeline: fingerprint inputs → read + clean + dedup (spooled) → tokenizer → pack shards → manifest last.
using System.Collections.Concurrent;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using DeepSeekCluster.DataShardService.Metrics;
using DeepSeekCluster.DataShardService.Storage;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;

namespace DeepSeekCluster.DataShardService.Preparation;

public sealed record PrepareResult(DatasetManifest Manifest, bool Reused);

/// <summary>
/// Deterministic: the dataset id is a hash of the request and of every input file's bytes, and the same id always
/// yields byte-identical shards and manifest. So an interrupted run is repaired by running again: leftovers of
/// incomplete puts are removed, shards are rewritten whole (each put is atomic), and the manifest, written
/// last, is what marks the dataset complete; a complete dataset is returned as is.
/// A killed run (SIGKILL included) leaves at most a staging folder, named with its process id, which the next
/// prepare run removes once that process is gone.
/// Memory: what grows with the corpus is the dedup index (about 1.7 KB per kept document at the default MinHash
/// settings, see <see cref="Deduplicator"/>) and the tokenizer trainer's distinct pre-tokens; texts stream from the
/// inputs through a spool file, at most one document (capped by cleaning.max_chars) or one encode chunk at a time.
/// </summary>
public sealed class DatasetPreparer(IDatasetStore store, string workRoot, PrepareHooks? hooks = null, DataShardsMetrics? metrics = null)
{
    public const string TrainSplit = "train";
    public const string ValidationSplit = "validation";
    private const ulong MixSeed = 0x4D49_5857_4549_4748;   // which documents get the fractional extra copy
    private const int EncodeChunk = 256;               // documents per parallel encode, and at most
    private const long EncodeChunkChars = 256 << 10;   // this many characters, so long documents do not pile up
    private static readonly ConcurrentDictionary<string, SemaphoreSlim> Locks = new();

    public async Task<PrepareResult> PrepareAsync(PrepareSpec spec, IProgress<string>? progress, CancellationToken ct)
    {
        spec.Validate();
        var cleaningSpec = spec.CleaningOrDefault;
        var dedupSpec = spec.DedupOrDefault;

        // ---- Fingerprint: every input file's bytes and the tokenizer decide the id ----
        var files = spec.Sources.Select(SourceReader.Files).ToList();
        var fileEntries = new List<List<SourceFileEntry>>();
        foreach (var sourceFiles in files)
        {
            var entries = new List<SourceFileEntry>();
            foreach (var f in sourceFiles)
            {
                await using var s = File.OpenRead(f.FullPath);
                entries.Add(new SourceFileEntry(f.RelativePath, s.Length, Convert.ToHexStringLower(await SHA256.HashDataAsync(s, ct))));
            }
            fileEntries.Add(entries);
        }
        BpeTokenizer? givenTokenizer = spec.TokenizerPath is null ? null : LoadTokenizer(spec.TokenizerPath);
        string datasetId = DatasetId(spec, cleaningSpec, dedupSpec, fileEntries, givenTokenizer?.Hash);
        progress?.Report($"dataset {datasetId}");

        var gate = Locks.GetOrAdd(datasetId, _ => new SemaphoreSlim(1, 1));
        await gate.WaitAsync(ct);
        try
        {
            string manifestPath = $"{datasetId}/{DatasetManifest.FileName}";
            if (await store.ReadTextAsync(manifestPath, ct) is { } existing)
            {
                progress?.Report($"dataset {datasetId} is already complete in {store.Describe(manifestPath)}");
                return new PrepareResult(DatasetManifest.FromJson(existing, store.Describe(manifestPath)), Reused: true);
            }
            await store.RemoveIncompleteAsync(datasetId + "/", ct);
            RemoveAbandonedStaging(datasetId, progress);

            string staging = Path.Combine(workRoot, $"{datasetId}-{Environment.ProcessId}-{Guid.NewGuid():N}");
            Directory.CreateDirectory(staging);
            try
            {
                var clock = System.Diagnostics.Stopwatch.StartNew();
                var manifest = await RunAsync(spec, cleaningSpec, dedupSpec, datasetId, files, fileEntries, givenTokenizer, staging, progress, ct);
                await store.PutTextAsync(manifestPath, manifest.ToJson(), ct);
                progress?.Report($"manifest written: {store.Describe(manifestPath)}");
                metrics?.PrepareCompleted(manifest.Report.RawBytes, clock.Elapsed);
                return new PrepareResult(manifest, Reused: false);
            }
            finally
            {
                Directory.Delete(staging, recursive: true);
            }
        }
        finally
        {
            gate.Release();
        }
    }

    private async Task<DatasetManifest> RunAsync(
        PrepareSpec spec, CleaningSpec cleaningSpec, DedupSpec dedupSpec, string datasetId,
        List<IReadOnlyList<SourceFile>> files, List<List<SourceFileEntry>> fileEntries, BpeTokenizer? givenTokenizer,
        string staging, IProgress<string>? progress, CancellationToken ct)
    {
        int sourceCount = spec.Sources.Count;
        var read = new long[sourceCount];
        var cleaned = new long[sourceCount];
        var deduped = new long[sourceCount];
        var inMix = new long[sourceCount];
        var tokensInMix = new long[sourceCount];
        long emptyFiles = 0;
        long rawBytes = 0;

        // ---- Pass 1: read, clean, dedup; kept documents go to the spool ----
        var cleaner = new TextCleaner(cleaningSpec);
        var dedup = new Deduplicator(dedupSpec);
        using var spool = new DocumentSpool(Path.Combine(staging, "documents.spool"));
        long inputBytes = fileEntries.Sum(f => f.Sum(e => e.Bytes));
        progress?.Report($"clean+dedup: reading {files.Sum(f => f.Count)} files ({inputBytes / 1e6:F1} MB on disk) of {sourceCount} sources");
        var readMeter = new StageMeter("clean+dedup", progress);
        for (int s = 0; s < sourceCount; s++)
        {
            var source = spec.Sources[s];
            foreach (var file in files[s])
            {
                long before = read[s];
                foreach (var (raw, rawLength) in SourceReader.Documents(source, file, cleaningSpec.MaxChars))
                {
                    ct.ThrowIfCancellationRequested();
                    read[s]++;
                    rawBytes += rawLength;
                    readMeter.Add(1, rawLength, () => $", {spool.Count} kept");
                    if (raw is null)
                    {
                        cleaner.CountTooLong(); // far over max_chars: the reader stopped holding it
                        continue;
                    }
                    if (cleaner.Clean(raw) is not { } text)
                        continue;
                    cleaned[s]++;
                    var hash = Deduplicator.TextHash(text);
                    if (dedup.Check(text, hash) != DedupVerdict.Unique)
                        continue;
                    deduped[s]++;
                    spool.Add(new SpooledDocument(s, hash, text));
                }
                if (read[s] == before)
                    emptyFiles++;
            }
            if (read[s] == 0)
                throw DataInputException.Invalid($"Source '{source.Name}' ('{source.Path}') holds no documents: every file is empty.");
        }
        spool.CompleteWriting();
        readMeter.Done($", {spool.Count} kept (exact duplicates {dedup.Counts.RemovedExact}, near duplicates {dedup.Counts.RemovedNear})");
        if (spool.Count == 0)
            throw DataInputException.Invalid(
                $"Every document of sources {string.Join(", ", spec.Sources.Select(x => $"'{x.Name}'"))} was removed by cleaning or dedup; " +
                $"cleaning counts: {JsonSerializer.Serialize(cleaner.Counts, DatasetManifest.Json)}");

        // ---- Tokenizer: given, or trained on the training side of the split ----
        BpeTokenizer tokenizer;
        if (givenTokenizer is not null)
        {
            tokenizer = givenTokenizer;
        }
        else
        {
            progress?.Report($"tokenizer: training vocab {spec.VocabSize} on the training side of {spool.Count} documents");
            var trainMeter = new StageMeter("tokenizer", progress);
            tokenizer = BpeTokenizer.Train(
                spool.Read().Where(d => !IsValidation(d.Hash, spec.ValidationFraction)).Select(d =>
                {
                    trainMeter.Add(1, Encoding.UTF8.GetByteCount(d.Text));
                    return d.Text;
                }),
                spec.VocabSize, progress: progress);
            trainMeter.Done($", vocab {tokenizer.VocabSize} trained (counting and merges)");
        }
        int eot = tokenizer.EosTokenId ?? throw DataInputException.Invalid(
            $"Tokenizer '{spec.TokenizerPath}' has no end-of-text token to join documents with.");
        string tokenizerFile = Path.Combine(staging, "tokenizer.json");
        tokenizer.Save(tokenizerFile);
        await store.PutFileAsync(tokenizerFile, $"{datasetId}/tokenizer.json", ct);
        progress?.Report($"tokenizer: vocab {tokenizer.VocabSize}, hash {tokenizer.Hash}");

        // ---- Pass 2..: tokenize and pack; round r takes the documents whose weight gives them more than r copies ----
        int tokenBytes = tokenizer.VocabSize <= 65536 ? 2 : 4;
        int sampleTokens = spec.SeqLen + 1;
        using var train = new ShardPacker(TrainSplit, sampleTokens, tokenBytes, spec.SamplesPerShard, staging);
        using var validation = new ShardPacker(ValidationSplit, sampleTokens, tokenBytes, spec.SamplesPerShard, staging);
        int rounds = (int)Math.Ceiling(spec.Sources.Max(x => x.Weight));
        long packed = 0;
        var packMeter = new StageMeter("tokenize+pack", progress);
        for (int round = 0; round < rounds; round++)
        {
            foreach (var chunk in Chunks(spool.Read().Where(d => Copies(d, spec.Sources[d.SourceIndex].Weight) > round)))
            {
                ct.ThrowIfCancellationRequested();
                var tokens = new int[chunk.Length][];
                Parallel.For(0, chunk.Length, i => tokens[i] = tokenizer.Encode(chunk[i].Text));
                for (int i = 0; i < chunk.Length; i++)
                {
                    (IsValidation(chunk[i].Hash, spec.ValidationFraction) ? validation : train).Add(tokens[i], eot);
                    inMix[chunk[i].SourceIndex]++;
                    tokensInMix[chunk[i].SourceIndex] += tokens[i].Length + 1;
                }
                packed += chunk.Length;
                packMeter.Add(chunk.Length, chunk.Sum(d => (long)Encoding.UTF8.GetByteCount(d.Text)),
                    () => $", round {round + 1}/{rounds}, {train.Samples} train + {validation.Samples} validation samples");
                await StoreFinishedAsync(datasetId, train, progress, ct);
                await StoreFinishedAsync(datasetId, validation, progress, ct);
            }
        }
        train.Complete();
        validation.Complete();
        await StoreFinishedAsync(datasetId, train, progress, ct);
        await StoreFinishedAsync(datasetId, validation, progress, ct);
        packMeter.Done($", {train.Samples} train + {validation.Samples} validation samples in {train.Shards.Count + validation.Shards.Count} shards");

        var sources = spec.Sources.Select((x, s) => new SourceEntry(
            x.Name, x.Weight, x.TextField, x.WholeFile, fileEntries[s], read[s], cleaned[s], deduped[s], inMix[s], tokensInMix[s])).ToList();
        return new DatasetManifest(
            DatasetManifest.CurrentFormat, datasetId, tokenizer.Hash, "tokenizer.json", tokenizer.VocabSize, eot,
            spec.SeqLen, sampleTokens, tokenBytes == 2 ? "uint16" : "uint32", sampleTokens * tokenBytes, spec.SamplesPerShard,
            spec.ValidationFraction,
            new Dictionary<string, SplitEntry>
            {
                [TrainSplit] = new(train.Samples, train.Tokens, train.Documents, train.TokensDropped, train.Shards),
                [ValidationSplit] = new(validation.Samples, validation.Tokens, validation.Documents, validation.TokensDropped, validation.Shards),
            },
            sources, cleaningSpec, dedupSpec, new PrepareReport(cleaner.Counts, dedup.Counts, emptyFiles, packed, rawBytes));
    }

    /// <summary>Up to EncodeChunk documents and EncodeChunkChars characters (always at least one document).</summary>
    private static IEnumerable<SpooledDocument[]> Chunks(IEnumerable<SpooledDocument> documents)
    {
        var chunk = new List<SpooledDocument>(EncodeChunk);
        long chars = 0;
        foreach (var d in documents)
        {
            if (chunk.Count > 0 && (chunk.Count == EncodeChunk || chars + d.Text.Length > EncodeChunkChars))
            {
                yield return [.. chunk];
                chunk.Clear();
                chars = 0;
            }
            chunk.Add(d);
            chars += d.Text.Length;
        }
        if (chunk.Count > 0)
            yield return [.. chunk];
    }

    /// <summary>
    /// Staging folders ("{dataset}-{pid}-{guid}") that no run will remove: those of ended processes (killed, or
    /// crashed), whatever their dataset, and this process's own for this dataset (runs of one dataset take turns at
    /// the gate held here, so one found now is a leftover). A live process's folder is left alone.
    /// </summary>
    private void RemoveAbandonedStaging(string datasetId, IProgress<string>? progress)
    {
        if (!Directory.Exists(workRoot))
            return;
        foreach (string dir in Directory.EnumerateDirectories(workRoot, "ds-*-*-*"))
        {
            string[] parts = Path.GetFileName(dir).Split('-');
            if (!int.TryParse(parts[^2], out int pid))
                continue;
            bool abandoned = pid == Environment.ProcessId
                ? Path.GetFileName(dir).StartsWith(datasetId + "-", StringComparison.Ordinal)
                : !IsRunning(pid);
            if (!abandoned)
                continue;
            Directory.Delete(dir, recursive: true);
            progress?.Report($"removed the staging folder {dir} of an interrupted run (process {pid})");
        }
    }

    private static bool IsRunning(int pid)
    {
        try
        {
            using var p = System.Diagnostics.Process.GetProcessById(pid);
            return !p.HasExited;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    private async Task StoreFinishedAsync(string datasetId, ShardPacker packer, IProgress<string>? progress, CancellationToken ct)
    {
        foreach (var shard in packer.TakeFinished().ToList())
        {
            await store.PutFileAsync(shard.LocalPath, $"{datasetId}/{shard.Entry.Path}", ct);
            progress?.Report($"shard {shard.Entry.Path}: {shard.Entry.Samples} samples, sha256 {shard.Entry.Sha256}");
            hooks?.ShardStored?.Invoke(shard.Entry);
        }
    }

    /// <summary>A document's side depends on its text alone, so exact duplicates and copies never straddle the split.</summary>
    internal static bool IsValidation(UInt128 hash, double fraction) => DatasetSplit.IsValidation(hash, fraction);

    internal static int Copies(SpooledDocument doc, double weight)
    {
        int whole = (int)Math.Floor(weight);
        double extra = weight - whole;
        return whole + (StableHash.ToUnitInterval(StableHash.Combine(MixSeed, (ulong)(doc.Hash >> 64))) < extra ? 1 : 0);
    }

    private static BpeTokenizer LoadTokenizer(string path)
    {
        if (!File.Exists(path))
            throw new DataInputException(DataErrorKind.NotFound, $"Tokenizer file '{path}' does not exist.");
        try
        {
            return BpeTokenizer.Load(path);
        }
        catch (Exception e) when (e is TokenizerFormatException or JsonException)
        {
            throw DataInputException.Invalid($"Tokenizer file '{path}' could not be read: {e.Message}");
        }
    }

    private static string DatasetId(PrepareSpec spec, CleaningSpec cleaning, DedupSpec dedup,
        List<List<SourceFileEntry>> files, string? tokenizerHash)
    {
        var identity = new
        {
            format = DatasetManifest.CurrentFormat,
            sources = spec.Sources.Select((s, i) => new { s.Name, s.Weight, s.TextField, s.WholeFile, files = files[i] }),
            spec.SeqLen,
            tokenizer = tokenizerHash ?? $"train:{spec.VocabSize}",
            spec.ValidationFraction,
            spec.SamplesPerShard,
            cleaning,
            dedup,
        };
        byte[] canonical = JsonSerializer.SerializeToUtf8Bytes(identity, DatasetManifest.Json);
        return "ds-" + Convert.ToHexStringLower(SHA256.HashData(canonical))[..16];
    }
}
