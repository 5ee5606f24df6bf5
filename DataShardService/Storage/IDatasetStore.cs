// Where prepared datasets live: a local folder, or Azure Blob storage (Azurite/Azure) when ConnectionStrings:blobs is set.
namespace DeepSeekCluster.DataShardService.Storage;

/// <summary>
/// Paths are '/'-separated and relative to the store's root: "{datasetId}/manifest.json",
/// "{datasetId}/train-00000.bin". Every put is atomic: a reader sees the whole object or none.
/// </summary>
public interface IDatasetStore
{
    /// <summary>Says where a path is, for messages ("/data/ds-1/train-00000.bin").</summary>
    string Describe(string path);

    Task<bool> ExistsAsync(string path, CancellationToken ct);

    /// <summary>Moves a finished local file into the store under <paramref name="path"/>, replacing what was there.</summary>
    Task PutFileAsync(string localFile, string path, CancellationToken ct);

    Task PutTextAsync(string path, string text, CancellationToken ct);

    /// <summary>The object's text, or null when it does not exist.</summary>
    Task<string?> ReadTextAsync(string path, CancellationToken ct);

    /// <summary>
    /// A local file with the object's bytes, for random access, checked against the expected length and SHA-256
    /// before it is returned: the folder store checks the file in place; a remote store checks its cached copy
    /// and downloads again when that is missing or corrupt. Throws a Corrupt <see cref="Preparation.DataInputException"/>
    /// naming the object when it is missing or its bytes do not match: a corrupt object is never handed out.
    /// </summary>
    Task<LocalCopy> GetVerifiedLocalFileAsync(string path, long bytes, string sha256, CancellationToken ct);

    /// <summary>Removes leftovers of interrupted puts under a prefix ("{datasetId}/").</summary>
    Task RemoveIncompleteAsync(string prefix, CancellationToken ct);
}

/// <summary>How a verified local copy was obtained (the cache hit and miss counters count these).</summary>
public enum LocalCopyKind
{
    InPlace,    // the store is local: no cache involved
    CacheHit,   // a cached copy passed verification
    Downloaded, // no usable cached copy: fetched, verified, then cached
}

public sealed record LocalCopy(string Path, LocalCopyKind Kind);
