// IDatasetStore on Azure Blob storage (a real account or Azurite): staged block blobs, shards cached locally on first read.
using System.Text;
using Azure;
using Azure.Identity;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Storage;

/// <summary>
/// Objects are block blobs named by their store path in one container. A put stages its blocks (invisible to
/// readers) under block ids unique to that put, then commits the block list, which publishes the whole blob in
/// one step; an interrupted put leaves only uncommitted blocks, which nobody can read and the service discards.
/// Reads for serving go through a local cache folder (same relative paths); a cached copy is used only after
/// its length and SHA-256 match the manifest, and a download is verified before it enters the cache.
/// </summary>
public sealed class AzureDatasetStore : IDatasetStore
{
    private const string DownloadMarker = ".download-";
    private readonly BlobContainerClient _container;
    private readonly int _blockBytes;
    private readonly Lazy<Task> _created;

    public AzureDatasetStore(BlobContainerClient container, string cacheDir, int blockBytes = 8 << 20)
    {
        _container = container;
        _blockBytes = blockBytes;
        CacheDir = Path.GetFullPath(cacheDir);
        _created = new Lazy<Task>(() => _container.CreateIfNotExistsAsync());
    }

    /// <summary>
    /// <paramref name="connection"/> is a connection string (<c>UseDevelopmentStorage=true</c>, an Azurite or account
    /// string) or an http(s) endpoint URI, which authenticates with <see cref="DefaultAzureCredential"/>.
    /// </summary>
    public static AzureDatasetStore Create(string connection, string container, string cacheDir, int blockBytes)
    {
        var service = IsEndpoint(connection, out var uri)
            ? new BlobServiceClient(uri, new DefaultAzureCredential())
            : new BlobServiceClient(connection);
        return new AzureDatasetStore(service.GetBlobContainerClient(container), cacheDir, blockBytes);
    }

    internal static bool IsEndpoint(string connection, out Uri uri) =>
        Uri.TryCreate(connection, UriKind.Absolute, out uri!) && (uri.Scheme == Uri.UriSchemeHttps || uri.Scheme == Uri.UriSchemeHttp);

    public string CacheDir { get; }

    public string Describe(string path) => $"{_container.Uri.ToString().TrimEnd('/')}/{Check(path)}";

    public async Task<bool> ExistsAsync(string path, CancellationToken ct)
    {
        try
        {
            return await _container.GetBlobClient(Check(path)).ExistsAsync(ct);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return false;
        }
    }

    public async Task PutFileAsync(string localFile, string path, CancellationToken ct)
    {
        await using (var s = new FileStream(localFile, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan))
            await PutStreamAsync(s, path, ct);
        File.Delete(localFile); // the contract is a move: the staging copy is gone once the blob is committed
    }

    public async Task PutTextAsync(string path, string text, CancellationToken ct)
    {
        using var s = new MemoryStream(new UTF8Encoding(false).GetBytes(text), writable: false);
        await PutStreamAsync(s, path, ct);
    }

    /// <summary>Stages <paramref name="content"/> in blocks, then commits them: the blob changes only at the commit.</summary>
    internal async Task PutStreamAsync(Stream content, string path, CancellationToken ct)
    {
        await _created.Value;
        var blob = _container.GetBlockBlobClient(Check(path));
        string put = Guid.NewGuid().ToString("N");
        var ids = new List<string>();
        var buffer = new byte[_blockBytes];
        while (true)
        {
            int filled = 0, read;
            while (filled < buffer.Length && (read = await content.ReadAsync(buffer.AsMemory(filled), ct)) > 0)
                filled += read;
            if (filled == 0)
                break; // an empty list commits an empty blob
            // Ids of one blob must all have the same length; the put's guid keeps other puts' blocks out of this list.
            string id = Convert.ToBase64String(Encoding.ASCII.GetBytes($"{put}-{ids.Count:D6}"));
            using (var block = new MemoryStream(buffer, 0, filled, writable: false))
                await blob.StageBlockAsync(id, block, cancellationToken: ct);
            ids.Add(id);
            if (filled < buffer.Length)
                break;
        }
        await blob.CommitBlockListAsync(ids, cancellationToken: ct);
    }

    public async Task<string?> ReadTextAsync(string path, CancellationToken ct)
    {
        try
        {
            var content = await _container.GetBlobClient(Check(path)).DownloadContentAsync(ct);
            return content.Value.Content.ToString();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null; // no such blob, or not even the container yet
        }
    }

    public async Task<LocalCopy> GetVerifiedLocalFileAsync(string path, long bytes, string sha256, CancellationToken ct)
    {
        string cached = Path.Combine(CacheDir, Check(path).Replace('/', Path.DirectorySeparatorChar));
        if (File.Exists(cached))
        {
            if (await FileDigest.MismatchAsync(cached, bytes, sha256, ct) is null)
                return new LocalCopy(cached, LocalCopyKind.CacheHit);
            File.Delete(cached); // a damaged cached copy is replaced, never served
        }

        Directory.CreateDirectory(Path.GetDirectoryName(cached)!);
        string download = cached + DownloadMarker + Guid.NewGuid().ToString("N");
        try
        {
            try
            {
                await _container.GetBlobClient(path).DownloadToAsync(download, ct);
            }
            catch (RequestFailedException e) when (e.Status == 404)
            {
                throw new DataInputException(DataErrorKind.Corrupt, $"Shard {Describe(path)} is missing; refusing to serve it.");
            }
            await FileDigest.VerifyAsync(download, bytes, sha256, Describe(path), ct);
            File.Move(download, cached, overwrite: true); // atomic: concurrent readers see the old verified copy or the new one
            return new LocalCopy(cached, LocalCopyKind.Downloaded);
        }
        finally
        {
            if (File.Exists(download))
                File.Delete(download);
        }
    }

    // Nothing to remove: an interrupted put left only uncommitted blocks, which are invisible, are dropped from the
    // blob when the next put commits its own list, and are discarded by the service after a week otherwise.
    public Task RemoveIncompleteAsync(string prefix, CancellationToken ct) => Task.CompletedTask;

    private static string Check(string path)
    {
        if (path.Length == 0 || path.StartsWith('/') || path.Contains('\\') || path.Split('/').Any(p => p is "" or "." or ".."))
            throw new ArgumentException($"Store path '{path}' must be relative, '/'-separated, without '.' or '..' parts.", nameof(path));
        return path;
    }
}
