// Where prepared datasets live: a folder here; Azure Blob (Azurite/Azure when ConnectionStrings__blobs is set) is to come.
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

    /// <summary>A local file with the object's bytes, for random access (a remote store downloads it once into its cache).</summary>
    Task<string> GetLocalFileAsync(string path, CancellationToken ct);

    /// <summary>Removes leftovers of interrupted puts under a prefix ("{datasetId}/").</summary>
    Task RemoveIncompleteAsync(string prefix, CancellationToken ct);
}
