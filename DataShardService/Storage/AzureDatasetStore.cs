// IDatasetStore on Azure Blob storage (a real account or Azurite): staged block blobs, shards cached locally on first read.
using System.Text;
using Azure;
using Azure.Identity;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Storage;

/// <summary>Retry policy of every blob request: exponential backoff with jitter, and the per-try network timeout.</summary>
public sealed record BlobRetry(int MaxRetries, TimeSpan Delay, TimeSpan MaxDelay, TimeSpan NetworkTimeout)
{
    public BlobRetry() : this(5, TimeSpan.FromSeconds(0.8), TimeSpan.FromSeconds(10), TimeSpan.FromSeconds(100))
    {
    }

    public BlobClientOptions ToClientOptions()
    {
        var options = new BlobClientOptions();
        options.Retry.Mode = Azure.Core.RetryMode.Exponential;
        options.Retry.MaxRetries = MaxRetries;
        options.Retry.Delay = Delay;
        options.Retry.MaxDelay = MaxDelay;
        options.Retry.NetworkTimeout = NetworkTimeout;
        return options;
    }
}

/// <summary>
/// Objects are block blobs named by their store path in one container. A put stages its blocks (invisible to
/// readers) under block ids unique to that put, then commits the block list, which publishes the whole blob in
/// one step; an interrupted put leaves only uncommitted blocks, which nobody can read and the service discards.
/// Reads for serving go through a local cache folder (same relative paths); a cached copy is used only after
/// its length and SHA-256 match the manifest, and a download is verified before it enters the cache.
///
/// Every request retries with exponential backoff (<see cref="BlobRetry"/>, the SDK's retry policy, which also
/// resumes an interrupted download where it stopped); when storage stays out of reach past the retries, the call
/// fails with an Unavailable <see cref="DataInputException"/> naming the blob endpoint, and a partial download is
/// deleted, never cached.
/// </summary>
public sealed class AzureDatasetStore : IDatasetStore
{
    private const string DownloadMarker = ".download-";
    private readonly BlobContainerClient _container;
    private readonly int _blockBytes;
    private Task? _created;

    public AzureDatasetStore(BlobContainerClient container, string cacheDir, int blockBytes = 8 << 20)
    {
        _container = container;
        _blockBytes = blockBytes;
        CacheDir = Path.GetFullPath(cacheDir);
    }

    /// <summary>
    /// <paramref name="connection"/> is a connection string (<c>UseDevelopmentStorage=true</c>, an Azurite or account
    /// string) or an http(s) endpoint URI, which authenticates with <see cref="DefaultAzureCredential"/>.
    /// </summary>
    public static AzureDatasetStore Create(string connection, string container, string cacheDir, int blockBytes, BlobRetry? retry = null)
    {
        var options = (retry ?? new BlobRetry()).ToClientOptions();
        var service = IsEndpoint(connection, out var uri)
            ? new BlobServiceClient(uri, new DefaultAzureCredential(), options)
            : new BlobServiceClient(connection, options);
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
            return await Reachable(path, "checking", () => _container.GetBlobClient(Check(path)).ExistsAsync(ct), ct);
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
    internal Task PutStreamAsync(Stream content, string path, CancellationToken ct) =>
        Reachable(path, "writing", async () =>
        {
            await PutBlocksAsync(content, path, ct);
            return true;
        }, ct);

    private async Task PutBlocksAsync(Stream content, string path, CancellationToken ct)
    {
        await EnsureContainerAsync();
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
            var content = await Reachable(path, "reading", () => _container.GetBlobClient(Check(path)).DownloadContentAsync(ct), ct);
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
                await Reachable(path, "reading", () => _container.GetBlobClient(path).DownloadToAsync(download, ct), ct);
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

    /// <summary>
    /// Runs one SDK call (which retries on its own) and turns "storage did not answer" — refused connections, resets,
    /// timeouts, 5xx after the last retry — into an Unavailable error that names the endpoint and what was being done.
    /// 404 and other answers pass through: they are about the blob, not about reaching storage.
    /// </summary>
    private async Task<T> Reachable<T>(string path, string doing, Func<Task<T>> call, CancellationToken ct)
    {
        try
        {
            return await call();
        }
        catch (Exception e) when (!ct.IsCancellationRequested && IsUnreachable(e))
        {
            throw new DataInputException(DataErrorKind.Unavailable,
                $"Blob storage at {_container.Uri.GetLeftPart(UriPartial.Path).TrimEnd('/')} did not answer while {doing} {Check(path)} " +
                $"(gave up after the configured retries, DataShards:BlobRetries): {Innermost(e).Message}");
        }
    }

    // Created once; a failed try (storage was down) is not remembered, so the next put tries again.
    private Task EnsureContainerAsync()
    {
        var created = _created;
        if (created is null || created.IsFaulted || created.IsCanceled)
            _created = created = _container.CreateIfNotExistsAsync();
        return created;
    }

    private static bool IsUnreachable(Exception e) => e switch
    {
        AggregateException a => a.InnerExceptions.All(IsUnreachable), // the retry policy's "Retry failed after N tries"
        RequestFailedException r => r.Status == 0 || r.Status >= 500,
        HttpRequestException or TimeoutException or TaskCanceledException => true,
        // A connection reset in the middle of a body; an IOException of the caller's own stream is not storage's.
        IOException io => io.InnerException is System.Net.Sockets.SocketException or HttpIOException,
        _ => false,
    };

    private static Exception Innermost(Exception e)
    {
        if (e is AggregateException a && a.InnerExceptions.Count > 0) e = a.InnerExceptions[^1];
        while (e.InnerException is { } inner) e = inner;
        return e;
    }

    private static string Check(string path)
    {
        if (path.Length == 0 || path.StartsWith('/') || path.Contains('\\') || path.Split('/').Any(p => p is "" or "." or ".."))
            throw new ArgumentException($"Store path '{path}' must be relative, '/'-separated, without '.' or '..' parts.", nameof(path));
        return path;
    }
}
