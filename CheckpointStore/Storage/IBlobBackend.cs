// The blob operations the checkpoint store needs, over a local folder or Azure Blob storage; not a general blob API.
namespace DeepSeekCluster.CheckpointStore.Storage;

/// <summary>A stored blob: its key (a '/'-separated path), its size, and the metadata set on it.</summary>
public sealed record BlobEntry(string Key, long Size, IReadOnlyDictionary<string, string> Metadata);

/// <summary>
/// Keys are '/'-separated relative paths (<c>{job}/{step:D8}/rank-0.safetensors</c>). A blob is written
/// either whole (<see cref="PutAsync"/>) or staged piece by piece and then published with
/// <see cref="CommitStagedAsync"/>: until then nothing is visible under the key, so a partial upload is
/// never mistaken for a file. A staging is identified by (key, stage id); the store uses the file's
/// announced SHA-256 as the stage id, so staged bytes of an upload with other content never count.
/// </summary>
public interface IBlobBackend
{
    /// <summary>Where the blobs live, for messages (a folder path or an account/container URI).</summary>
    string Location { get; }

    /// <summary>True when the client library already retries each request with the configured backoff (Azure): <see cref="BlobRetry"/> then tries once.</summary>
    bool RetriesItself => false;

    /// <summary>Bytes staged so far for (key, stageId) that form a prefix of the file; 0 if none.</summary>
    Task<long> GetStagedLengthAsync(string key, string stageId, CancellationToken ct);

    /// <summary>Appends <paramref name="data"/> at <paramref name="offset"/>, which must equal the staged length.</summary>
    Task AppendStagedAsync(string key, string stageId, long offset, ReadOnlyMemory<byte> data, CancellationToken ct);

    /// <summary>Publishes the staged bytes [0, length) under <paramref name="key"/> with metadata, replacing any blob there; drops other stagings of the key.</summary>
    Task CommitStagedAsync(string key, string stageId, long length, IReadOnlyDictionary<string, string> metadata, CancellationToken ct);

    /// <summary>Writes a whole blob atomically. With <paramref name="onlyIfAbsent"/>, returns false (and writes nothing) if the key exists.</summary>
    Task<bool> PutAsync(string key, ReadOnlyMemory<byte> data, IReadOnlyDictionary<string, string> metadata, bool onlyIfAbsent, CancellationToken ct);

    /// <summary>Replaces the metadata of an existing blob.</summary>
    Task SetMetadataAsync(string key, IReadOnlyDictionary<string, string> metadata, CancellationToken ct);

    /// <summary>Size and metadata of a published blob, or null if there is none.</summary>
    Task<BlobEntry?> GetInfoAsync(string key, CancellationToken ct);

    /// <summary>Reads exactly <paramref name="buffer"/>.Length bytes from <paramref name="offset"/>; <see cref="EndOfStreamException"/> if the blob is shorter.</summary>
    Task ReadAsync(string key, long offset, Memory<byte> buffer, CancellationToken ct);

    /// <summary>Published blobs whose key starts with <paramref name="prefix"/>; with <paramref name="includeStaged"/> also keys that only have staged bytes (size -1).</summary>
    Task<IReadOnlyList<BlobEntry>> ListAsync(string prefix, bool includeStaged, CancellationToken ct);

    /// <summary>Deletes the blob and any staging of it; a missing key is not an error.</summary>
    Task DeleteAsync(string key, CancellationToken ct);
}
