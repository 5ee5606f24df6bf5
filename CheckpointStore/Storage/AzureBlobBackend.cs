// Blob backend over Azure Blob storage (a real account or Azurite) through Azure.Storage.Blobs.
using System.Security.Cryptography;
using System.Text;
using Azure;
using Azure.Identity;
using Azure.Storage.Blobs;
using Azure.Storage.Blobs.Models;
using Azure.Storage.Blobs.Specialized;

namespace DeepSeekCluster.CheckpointStore.Storage;

/// <summary>
/// Keys are block blob names in one container. Staging uses the service's own two phases: blocks are
/// staged (invisible, kept by the service for a week) and the block list is committed at the end, which
/// publishes the blob in one step. A block id encodes (stage, offset), so the staged prefix of an upload
/// can be found again after a dropped connection and blocks of an upload with other content never count.
/// </summary>
public sealed class AzureBlobBackend : IBlobBackend
{
    private readonly BlobContainerClient _container;
    private readonly Lazy<Task> _created;

    public AzureBlobBackend(BlobContainerClient container)
    {
        _container = container;
        Location = container.Uri.ToString();
        _created = new Lazy<Task>(() => _container.CreateIfNotExistsAsync());
    }

    /// <summary>
    /// <paramref name="connection"/> is either a connection string (<c>UseDevelopmentStorage=true</c>, an explicit
    /// Azurite or account string) or an https endpoint URI, which authenticates with <see cref="DefaultAzureCredential"/>.
    /// </summary>
    public static AzureBlobBackend Create(string connection, StorageOptions options)
    {
        var clientOptions = new BlobClientOptions();
        // The SDK is the one retry layer for Azure (BlobRetry sees its final error): it retries each HTTP request, the
        // ranged reads of a download included, and honours the service's Retry-After on throttling.
        clientOptions.Retry.Mode = Azure.Core.RetryMode.Exponential;
        clientOptions.Retry.MaxRetries = options.RetryCount - 1;
        clientOptions.Retry.Delay = TimeSpan.FromMilliseconds(options.RetryBaseDelayMs);
        clientOptions.Retry.MaxDelay = TimeSpan.FromMilliseconds(options.RetryMaxDelayMs);
        clientOptions.Retry.NetworkTimeout = TimeSpan.FromSeconds(options.NetworkTimeoutSeconds);
        BlobServiceClient service = Uri.TryCreate(connection, UriKind.Absolute, out var uri) && (uri.Scheme == "https" || uri.Scheme == "http")
            ? new BlobServiceClient(uri, new DefaultAzureCredential(), clientOptions)
            : new BlobServiceClient(connection, clientOptions);
        return new AzureBlobBackend(service.GetBlobContainerClient(options.Container));
    }

    public string Location { get; }

    public bool RetriesItself => true;

    public async Task<long> GetStagedLengthAsync(string key, string stageId, CancellationToken ct)
    {
        await _created.Value;
        return StagedChain(await UncommittedBlocksAsync(key, ct), stageId).Length;
    }

    public async Task AppendStagedAsync(string key, string stageId, long offset, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        await _created.Value;
        using var content = new MemoryStream(data.ToArray(), writable: false);
        await Block(key).StageBlockAsync(BlockId(stageId, offset), content, cancellationToken: ct);
    }

    public async Task CommitStagedAsync(string key, string stageId, long length, IReadOnlyDictionary<string, string> metadata, CancellationToken ct)
    {
        await _created.Value;
        var (ids, staged) = StagedChain(await UncommittedBlocksAsync(key, ct), stageId);
        if (staged != length)
            throw new InvalidOperationException($"Staged blocks of '{key}' cover {staged} bytes, not the {length} to commit.");
        await Block(key).CommitBlockListAsync(ids, new CommitBlockListOptions { Metadata = ToDictionary(metadata) }, ct);
    }

    public async Task<bool> PutAsync(string key, ReadOnlyMemory<byte> data, IReadOnlyDictionary<string, string> metadata, bool onlyIfAbsent, CancellationToken ct)
    {
        await _created.Value;
        var options = new BlobUploadOptions { Metadata = ToDictionary(metadata) };
        if (onlyIfAbsent) options.Conditions = new BlobRequestConditions { IfNoneMatch = ETag.All };
        try
        {
            // Small blobs go up in one Put Blob request, which the service applies atomically.
            await _container.GetBlobClient(key).UploadAsync(BinaryData.FromBytes(data), options, ct);
            return true;
        }
        catch (RequestFailedException e) when (onlyIfAbsent && (e.Status == 409 || e.Status == 412))
        {
            return false;
        }
    }

    public async Task SetMetadataAsync(string key, IReadOnlyDictionary<string, string> metadata, CancellationToken ct)
    {
        await _created.Value;
        await _container.GetBlobClient(key).SetMetadataAsync(ToDictionary(metadata), cancellationToken: ct);
    }

    public async Task<BlobEntry?> GetInfoAsync(string key, CancellationToken ct)
    {
        await _created.Value;
        try
        {
            BlobProperties p = await _container.GetBlobClient(key).GetPropertiesAsync(cancellationToken: ct);
            return new BlobEntry(key, p.ContentLength, new Dictionary<string, string>(p.Metadata));
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return null;
        }
    }

    public async Task ReadAsync(string key, long offset, Memory<byte> buffer, CancellationToken ct)
    {
        await _created.Value;
        if (buffer.IsEmpty) return;
        var options = new BlobDownloadOptions { Range = new HttpRange(offset, buffer.Length) };
        BlobDownloadStreamingResult result = await _container.GetBlobClient(key).DownloadStreamingAsync(options, ct);
        await using var stream = result.Content;
        try
        {
            await stream.ReadExactlyAsync(buffer, ct);
        }
        catch (EndOfStreamException)
        {
            throw new EndOfStreamException($"Blob '{key}' in {Location} ended before byte {offset + buffer.Length}.");
        }
    }

    public async Task<IReadOnlyList<BlobEntry>> ListAsync(string prefix, bool includeStaged, CancellationToken ct)
    {
        await _created.Value;
        var result = new List<BlobEntry>();
        var states = includeStaged ? BlobStates.Uncommitted : BlobStates.None;
        await foreach (var item in _container.GetBlobsAsync(BlobTraits.Metadata, states, prefix, ct))
        {
            result.Add(new BlobEntry(item.Name, item.Properties.ContentLength ?? 0,
                item.Metadata is null ? new Dictionary<string, string>() : new Dictionary<string, string>(item.Metadata)));
        }
        return result;
    }

    public async Task DeleteAsync(string key, CancellationToken ct)
    {
        await _created.Value;
        // A blob with only staged blocks cannot be deleted; the service drops such blocks after a week.
        await _container.GetBlobClient(key).DeleteIfExistsAsync(DeleteSnapshotsOption.IncludeSnapshots, cancellationToken: ct);
    }

    // ---- Blocks ----

    private BlockBlobClient Block(string key) => _container.GetBlockBlobClient(key);

    private async Task<IReadOnlyList<BlobBlock>> UncommittedBlocksAsync(string key, CancellationToken ct)
    {
        try
        {
            BlockList list = await Block(key).GetBlockListAsync(BlockListTypes.Uncommitted, cancellationToken: ct);
            return list.UncommittedBlocks.ToList();
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            return [];
        }
    }

    /// <summary>"{stage16}-{offset:D16}" in base64: every id of a blob must have the same length, and this one does.</summary>
    private static string BlockId(string stageId, long offset) =>
        Convert.ToBase64String(Encoding.ASCII.GetBytes($"{StageTag(stageId)}-{offset:D16}"));

    private static string StageTag(string stageId) =>
        Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(stageId)))[..16];

    /// <summary>The blocks of this stage that tile [0, n) without a gap, in order, and n.</summary>
    private static (List<string> Ids, long Length) StagedChain(IReadOnlyList<BlobBlock> blocks, string stageId)
    {
        string tag = StageTag(stageId);
        var byOffset = new Dictionary<long, (string Id, long Size)>();
        foreach (var block in blocks)
        {
            string text;
            try { text = Encoding.ASCII.GetString(Convert.FromBase64String(block.Name)); }
            catch (FormatException) { continue; } // not one of ours
            if (text.Length != 33 || !text.StartsWith(tag + "-", StringComparison.Ordinal)) continue;
            if (long.TryParse(text.AsSpan(17), out long offset)) byOffset[offset] = (block.Name, block.SizeLong);
        }
        var ids = new List<string>();
        long length = 0;
        while (byOffset.TryGetValue(length, out var next) && next.Size > 0)
        {
            ids.Add(next.Id);
            length += next.Size;
        }
        return (ids, length);
    }

    private static Dictionary<string, string> ToDictionary(IReadOnlyDictionary<string, string> metadata) =>
        metadata.ToDictionary(kv => kv.Key, kv => kv.Value);
}
