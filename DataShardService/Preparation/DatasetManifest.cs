// manifest.json of a prepared dataset: what the shards hold and how they were made. Written last; its presence means "complete".
using System.Text.Json;
using System.Text.Json.Serialization;

namespace DeepSeekCluster.DataShardService.Preparation;

public sealed record ShardEntry(string Path, long Samples, long Bytes, string Sha256);

public sealed record SplitEntry(long Samples, long Tokens, long Documents, long TokensDropped, IReadOnlyList<ShardEntry> Shards);

public sealed record SourceFileEntry(string Path, long Bytes, string Sha256);

public sealed record SourceEntry(
    string Name, double Weight, string TextField, bool WholeFile, IReadOnlyList<SourceFileEntry> Files,
    long DocumentsRead, long DocumentsAfterCleaning, long DocumentsAfterDedup, long DocumentsInMix, long TokensInMix);

/// <summary><paramref name="RawBytes"/>: UTF-8 bytes of the documents as read, before cleaning (what throughput is measured in).</summary>
public sealed record PrepareReport(CleaningCounts Cleaning, DedupCounts Dedup, long EmptyFiles, long DocumentsPacked, long RawBytes);

public sealed record DatasetManifest(
    string Format,
    string DatasetId,
    string TokenizerHash,
    string TokenizerPath,
    int VocabSize,
    int EotTokenId,
    int SeqLen,
    int SampleTokens,
    string TokenType,        // "uint16" or "uint32", little-endian
    int RecordBytes,         // SampleTokens × token width: sample i of a shard starts at byte i × RecordBytes
    int SamplesPerShard,     // every shard but the last of a split holds exactly this many
    double ValidationFraction,
    IReadOnlyDictionary<string, SplitEntry> Splits,
    IReadOnlyList<SourceEntry> Sources,
    CleaningSpec Cleaning,
    DedupSpec Dedup,
    PrepareReport Report)
{
    public const string CurrentFormat = "deepseekcluster.token-shards/1";
    public const string FileName = "manifest.json";

    public static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public static DatasetManifest FromJson(string json, string source) =>
        JsonSerializer.Deserialize<DatasetManifest>(json, Json)
        ?? throw new DataInputException(DataErrorKind.Corrupt, $"Manifest '{source}' is empty.");
}
