// The chunk-hash records of stored checkpoint files: the sidecar list, its digest in the file's metadata, and hashing a
// stored file back from storage. Not the upload protocol (CheckpointStoreService) nor the hashes themselves (ChunkHashes).
using System.Security.Cryptography;
using DeepSeekCluster.CheckpointStore.Storage;

namespace DeepSeekCluster.CheckpointStore.Services;

/// <summary>
/// A stored file's verified chunk hashes live in a sidecar blob (<see cref="ChunkHashes.SidecarKey"/>) whose digest the
/// file's metadata carries, so a list that does not belong to the file's bytes is never believed.
/// </summary>
internal sealed class StoredChunkRecords(IBlobBackend blobs, BlobRetry retry)
{
    private static readonly Dictionary<string, string> NoMetadata = new();

    public Task PutListAsync(string key, ChunkHashes chunks, CancellationToken ct)
    {
        string sidecar = ChunkHashes.SidecarKey(key);
        byte[] bytes = chunks.Serialize();
        return retry.RunAsync($"write {sidecar}", c => blobs.PutAsync(sidecar, bytes, NoMetadata, onlyIfAbsent: false, c), ct);
    }

    /// <summary>Writes the chunk list of an already stored file, then sets its metadata (<paramref name="metadata"/> plus the list's hash).</summary>
    public async Task RecordAsync(string key, ChunkHashes chunks, Dictionary<string, string> metadata, CancellationToken ct)
    {
        await PutListAsync(key, chunks, ct);
        metadata[ChunkHashes.MetadataKey] = ChunkHashes.Digest(chunks.Serialize());
        await retry.RunAsync($"set the metadata of {key}", c => blobs.SetMetadataAsync(key, metadata, c), ct);
    }

    /// <summary>The chunk hashes the store verified for a stored file, or null when it recorded none (stored by an older store).</summary>
    public async Task<ChunkHashes?> ReadAsync(string key, BlobEntry info, CancellationToken ct)
    {
        if (info.Metadata.GetValueOrDefault(ChunkHashes.MetadataKey) is not { } digest) return null;
        string sidecar = ChunkHashes.SidecarKey(key);
        var sidecarInfo = await retry.RunAsync($"read the properties of {sidecar}", c => blobs.GetInfoAsync(sidecar, c), ct);
        if (sidecarInfo is null) return null; // the list is gone: the caller recomputes it from the file
        byte[] bytes = new byte[sidecarInfo.Size];
        await retry.RunAsync($"read {sidecar}", c => blobs.ReadAsync(sidecar, 0, bytes, c), ct);
        var chunks = ChunkHashes.Parse(bytes, sidecar);
        if (ChunkHashes.Digest(bytes) != digest || chunks.Hashes.Count != ChunkHashes.Count(info.Size, chunks.ChunkBytes)) return null;
        return chunks;
    }

    /// <summary>The SHA-256 and chunk hashes of a stored file, read back from storage.</summary>
    public async Task<(string Sha256, ChunkHashes Chunks)> HashBlobAsync(string key, long size, long chunkBytes, CancellationToken ct)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var chunker = new ChunkHasher(chunkBytes);
        byte[] buffer = new byte[Math.Min(size, 4 << 20)];
        for (long at = 0; at < size; at += buffer.Length)
        {
            var part = buffer.AsMemory(0, (int)Math.Min(buffer.Length, size - at));
            long from = at;
            await retry.RunAsync($"read {key} at {from}", c => blobs.ReadAsync(key, from, part, c), ct);
            hash.AppendData(part.Span);
            chunker.Append(part.Span);
        }
        return (Convert.ToHexStringLower(hash.GetHashAndReset()), chunker.Finish());
    }
}
