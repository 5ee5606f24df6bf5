// manifest.json of a sharded checkpoint: what was saved, from which layout, and which file holds which rows of each tensor.
using DeepSeekCluster.Training.Parallel;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>Rows [<see cref="RowStart"/>, +<see cref="RowCount"/>) of a tensor (dim 0), stored whole under the tensor's name in <see cref="File"/>.</summary>
public sealed record ManifestSlice(
    [property: JsonPropertyName("file")] string File,
    [property: JsonPropertyName("row_start")] long RowStart,
    [property: JsonPropertyName("row_count")] long RowCount);

/// <summary>A tensor's full shape and dtype (safetensors name, "F32"...) and its slices, ordered by row.</summary>
public sealed record ManifestTensor(
    [property: JsonPropertyName("dtype")] string Dtype,
    [property: JsonPropertyName("shape")] long[] Shape,
    [property: JsonPropertyName("slices")] IReadOnlyList<ManifestSlice> Slices)
{
    /// <summary>Rows along dim 0; a scalar counts as one row.</summary>
    [JsonIgnore] public long Rows => Shape.Length == 0 ? 1 : Shape[0];
}

/// <summary>
/// A file of the checkpoint with the size and lower-case hex SHA-256 its writer reported (what a store checks at commit
/// and <see cref="FolderCheckpointStore.VerifyAsync"/> rehashes). Optionally also a hash of each
/// <see cref="ChunkBytes"/>-byte range of the file (the last one shorter), so a reader can verify the ranges on several
/// cores at once and overlap them with the reads: one file's SHA-256 cannot be split, and one core's hashing would cap a
/// one-file load. Writers record XXH128 (<see cref="ChunkXxh128"/>), which hashes at memory speed; manifests written
/// before it existed carry SHA-256 per chunk (<see cref="ChunkSha256"/>) or no chunk hashes at all, and a reader then
/// checks what they have.
/// </summary>
public sealed record ManifestFile(
    [property: JsonPropertyName("name")] string Name,
    [property: JsonPropertyName("size")] long Size,
    [property: JsonPropertyName("sha256")] string Sha256)
{
    /// <summary>
    /// A chunk the size a reader hashes while the next one is read, small enough that a one-file checkpoint of a
    /// small model spreads over a GPU machine's cores (925 MB: 28 chunks), large enough that the list stays short.
    /// </summary>
    public const long DefaultChunkBytes = 32L << 20;

    [JsonPropertyName("chunk_bytes")] public long? ChunkBytes { get; init; }
    /// <summary>Lower-case hex XXH128 (System.IO.Hashing, canonical big-endian bytes) of each chunk: what writers record.</summary>
    [JsonPropertyName("chunk_xxh128")] public IReadOnlyList<string>? ChunkXxh128 { get; init; }
    /// <summary>Lower-case hex SHA-256 of each chunk: what writers recorded before <see cref="ChunkXxh128"/>; still verified.</summary>
    [JsonPropertyName("chunk_sha256")] public IReadOnlyList<string>? ChunkSha256 { get; init; }

    /// <summary>Ranges [i·ChunkBytes, min((i+1)·ChunkBytes, Size)) of a file of <paramref name="size"/> bytes.</summary>
    public static long ChunkCount(long size, long chunkBytes) => (size + chunkBytes - 1) / chunkBytes;

    /// <summary>The chunk hashes a reader verifies (XXH128 where present, else SHA-256), or null when the file has none.</summary>
    [JsonIgnore] public ChunkHashList? ChunkHashes =>
        ChunkBytes is not { } bytes ? null
        : ChunkXxh128 is { } x ? new ChunkHashList(ChunkHashAlgorithm.Xxh128, bytes, x)
        : ChunkSha256 is { } s ? new ChunkHashList(ChunkHashAlgorithm.Sha256, bytes, s)
        : null;

    /// <summary>The chunk hashes, if present, are complete: one well-formed hash per range, ranges covering the whole file.</summary>
    internal void Validate(string source)
    {
        if (ChunkBytes is null && ChunkSha256 is null && ChunkXxh128 is null) return;
        if (ChunkBytes is not { } bytes || bytes < 1 || ChunkSha256 is null && ChunkXxh128 is null)
            throw new InvalidDataException($"{source}: file '{Name}' needs both chunk_bytes (at least 1) and chunk hashes (chunk_xxh128 or chunk_sha256), or neither; " +
                $"it has chunk_bytes {ChunkBytes?.ToString() ?? "(none)"} and {(ChunkXxh128 ?? ChunkSha256)?.Count.ToString() ?? "no"} chunk hashes");
        long expected = ChunkCount(Size, bytes);
        foreach (var (field, hashes, digits) in new[] { ("chunk_xxh128", ChunkXxh128, 32), ("chunk_sha256", ChunkSha256, 64) })
        {
            if (hashes is null) continue;
            if (hashes.Count != expected)
                throw new InvalidDataException($"{source}: file '{Name}' of {Size} bytes in chunks of {bytes} needs {expected} chunk hashes; the manifest lists {hashes.Count} in {field}");
            for (int i = 0; i < hashes.Count; i++)
                if (hashes[i] is not { } h || h.Length != digits || !h.All(char.IsAsciiHexDigitLower))
                    throw new InvalidDataException($"{source}: chunk {i} of file '{Name}' has {field} '{hashes[i]}'; expected {digits} lower-case hex digits");
        }
    }
}

public enum ChunkHashAlgorithm { Xxh128, Sha256 }

/// <summary>One file's chunk hashes of one algorithm: hash i covers bytes [i·ChunkBytes, min((i+1)·ChunkBytes, size)).</summary>
public sealed record ChunkHashList(ChunkHashAlgorithm Algorithm, long ChunkBytes, IReadOnlyList<string> Hashes)
{
    public string Label => Algorithm == ChunkHashAlgorithm.Xxh128 ? "XXH128" : "SHA-256";

    /// <summary>A fresh incremental hasher of this list's algorithm.</summary>
    public IChunkHash NewHasher() => ChunkHash.Create(Algorithm);
}

/// <summary>Where training stood when the checkpoint was taken.</summary>
public sealed record CheckpointPosition(long Step, long Generation, long ConsumedSamples, long OptimizerSteps);

/// <summary>
/// What fixes the order of the training samples besides the consumed count: a resume that changes any of these would
/// see other samples than the uninterrupted run.
/// </summary>
public sealed record DataOrder(
    [property: JsonPropertyName("seed")] long Seed,
    [property: JsonPropertyName("global_batch")] int GlobalBatch,
    [property: JsonPropertyName("seq_len")] int SeqLen);

/// <summary>
/// The manifest, written last: a step without one does not exist. Field names match what the CheckpointStore
/// service adds itself ("job", "step", "generation", "files", "committed_utc"), so the same JSON describes a
/// checkpoint in a folder and in blob storage. There are no RNG states: training draws no random numbers and the
/// data order is a function of (seed, consumed samples).
/// </summary>
public sealed record CheckpointManifest
{
    public const string FileName = "manifest.json";
    public const string CurrentFormat = "deepseek-cluster/sharded-checkpoint/1";

    [JsonPropertyName("format")] public string Format { get; init; } = CurrentFormat;
    [JsonPropertyName("job")] public required string Job { get; init; }
    [JsonPropertyName("step")] public required long Step { get; init; }
    [JsonPropertyName("generation")] public long Generation { get; init; }
    [JsonPropertyName("consumed_samples")] public long ConsumedSamples { get; init; }
    /// <summary>AdamW's t (bias correction); differs from Step when a run was imported or restarted its optimizer.</summary>
    [JsonPropertyName("optimizer_steps")] public long OptimizerSteps { get; init; }
    [JsonPropertyName("layout")] public required ParallelLayout Layout { get; init; }
    [JsonPropertyName("tensors")] public required IReadOnlyDictionary<string, ManifestTensor> Tensors { get; init; }
    /// <summary>Sorted by name (ordinal), as the store writes them.</summary>
    [JsonPropertyName("files")] public required IReadOnlyList<ManifestFile> Files { get; init; }
    /// <summary>The model's config.json, embedded verbatim.</summary>
    [JsonPropertyName("config")] public JsonElement? Config { get; init; }
    [JsonPropertyName("tokenizer_sha256")] public string? TokenizerSha256 { get; init; }
    /// <summary>Set by the standalone trainer, which checks it on resume; cluster jobs keep theirs in the job spec.</summary>
    [JsonPropertyName("data_order")] public DataOrder? DataOrder { get; init; }
    [JsonPropertyName("committed_utc")] public string? CommittedUtc { get; init; }

    public CheckpointPosition Position => new(Step, Generation, ConsumedSamples, OptimizerSteps);

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public static CheckpointManifest FromJson(string json, string source)
    {
        CheckpointManifest? manifest;
        try { manifest = JsonSerializer.Deserialize<CheckpointManifest>(json, Json); }
        catch (JsonException e) { throw new InvalidDataException($"{source}: not a checkpoint manifest ({e.Message})", e); }
        return (manifest ?? throw new InvalidDataException($"{source}: the manifest is empty")).Validated(source);
    }

    /// <summary>
    /// Checks what a loader relies on: a known format, a valid layout, every slice in a listed file, and the slices of
    /// each tensor covering its rows exactly once, in order.
    /// </summary>
    public CheckpointManifest Validated(string source)
    {
        if (Format != CurrentFormat) throw new InvalidDataException($"{source}: manifest format '{Format}', expected '{CurrentFormat}'");
        Layout.Validated();
        var files = Files.Select(f => f.Name).ToHashSet(StringComparer.Ordinal);
        foreach (var f in Files) f.Validate(source);
        foreach (var (name, t) in Tensors)
        {
            long next = 0;
            foreach (var s in t.Slices)
            {
                if (!files.Contains(s.File)) throw new InvalidDataException($"{source}: tensor '{name}' has a slice in '{s.File}', which is not a file of the checkpoint");
                if (s.RowStart != next || s.RowCount < 1)
                    throw new InvalidDataException($"{source}: tensor '{name}' has a slice of rows [{s.RowStart}, {s.RowStart + s.RowCount}) in {s.File}; expected one starting at row {next}");
                next += s.RowCount;
            }
            if (next != t.Rows) throw new InvalidDataException($"{source}: the slices of tensor '{name}' cover {next} of its {t.Rows} rows");
        }
        return this;
    }
}
