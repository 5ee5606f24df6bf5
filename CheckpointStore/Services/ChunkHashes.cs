// Per-chunk XXH128 hashes of stored checkpoint files: verified on upload, kept beside the file, written into the manifest, checked on download.
using System.IO.Hashing;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;
using Google.Protobuf.Collections;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Services.CheckpointKeys;

namespace DeepSeekCluster.CheckpointStore.Services;

/// <summary>
/// The XXH128 of each <see cref="ChunkBytes"/>-byte range of a file (the last one shorter), lower-case hex of the
/// canonical bytes: the same list the trainer's folder store writes as "chunk_xxh128". The store keeps it in a sidecar
/// blob (<see cref="SidecarKey"/>: a name no uploaded file can have), whose SHA-256 is in the file's metadata.
/// </summary>
internal sealed partial record ChunkHashes(long ChunkBytes, IReadOnlyList<string> Hashes)
{
    /// <summary>What the store records for an upload that announces none: the trainer's default.</summary>
    public const long DefaultChunkBytes = 32L << 20;
    /// <summary>Bounds on an announced chunk size: a download verifies whole chunks, so each is read into memory.</summary>
    public const long MinChunkBytes = 4 << 10, MaxChunkBytes = 64L << 20;
    /// <summary>Metadata of a stored file: the SHA-256 of its sidecar, set together with the file's own SHA-256.</summary>
    public const string MetadataKey = "chunkxxh128";

    [GeneratedRegex("^[0-9a-f]{32}$")]
    private static partial Regex Xxh128Hex();

    public static long Count(long size, long chunkBytes) => (size + chunkBytes - 1) / chunkBytes;

    /// <summary>{job}/{step}/chunks/{file}: file names cannot contain '/', so no upload can take this key.</summary>
    public static string SidecarKey(string fileKey)
    {
        int slash = fileKey.LastIndexOf('/');
        return $"{fileKey[..slash]}/chunks/{fileKey[(slash + 1)..]}";
    }

    /// <summary>The chunk hashes an upload or a commit announces, checked for form; null when it announces none.</summary>
    public static ChunkHashes? Announced(long chunkBytes, RepeatedField<string> hashes, long size, string fileName)
    {
        if (chunkBytes == 0 && hashes.Count == 0) return null;
        if (chunkBytes < MinChunkBytes || chunkBytes > MaxChunkBytes)
            throw Invalid($"{fileName}: chunk_bytes {chunkBytes} is outside [{MinChunkBytes}, {MaxChunkBytes}]");
        long expected = Count(size, chunkBytes);
        if (hashes.Count != expected)
            throw Invalid($"{fileName}: {size} bytes in chunks of {chunkBytes} need {expected} chunk hashes; {hashes.Count} were sent");
        for (int i = 0; i < hashes.Count; i++)
            if (!Xxh128Hex().IsMatch(hashes[i]))
                throw Invalid($"{fileName}: the XXH128 of chunk {i}, '{hashes[i]}', is not 32 lower-case hex digits");
        return new ChunkHashes(chunkBytes, [.. hashes]);
    }

    public bool SameAs(ChunkHashes other) => ChunkBytes == other.ChunkBytes && Hashes.SequenceEqual(other.Hashes, StringComparer.Ordinal);

    /// <summary>The first chunk whose hash differs from <paramref name="actual"/>'s, or -1.</summary>
    public int FirstDifference(ChunkHashes actual)
    {
        for (int i = 0; i < Hashes.Count; i++)
            if (i >= actual.Hashes.Count || actual.Hashes[i] != Hashes[i]) return i;
        return -1;
    }

    public (long Start, long End) Range(int chunk, long size) => (chunk * ChunkBytes, Math.Min((chunk + 1) * ChunkBytes, size));

    /// <summary>The sidecar's bytes: "xxh128 {chunk_bytes}" then one hash per line.</summary>
    public byte[] Serialize() => Encoding.ASCII.GetBytes($"xxh128 {ChunkBytes}\n" + string.Concat(Hashes.Select(h => h + "\n")));

    public static string Digest(ReadOnlySpan<byte> serialized) => Convert.ToHexStringLower(SHA256.HashData(serialized));

    public static ChunkHashes Parse(ReadOnlySpan<byte> serialized, string source)
    {
        var lines = Encoding.ASCII.GetString(serialized).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        if (lines.Length == 0 || !lines[0].StartsWith("xxh128 ", StringComparison.Ordinal) || !long.TryParse(lines[0].AsSpan(7), out long bytes) || bytes < 1)
            throw new RpcException(new Status(StatusCode.DataLoss, $"{source} is not a chunk hash list"));
        return new ChunkHashes(bytes, lines[1..]);
    }
}

/// <summary>XXH128 of consecutive fixed-size ranges of bytes appended in order.</summary>
internal sealed class ChunkHasher(long chunkBytes)
{
    readonly XxHash128 current = new();
    readonly List<string> done = [];
    long filled;

    public void Append(ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            int n = (int)Math.Min(bytes.Length, chunkBytes - filled);
            current.Append(bytes[..n]);
            bytes = bytes[n..];
            if ((filled += n) == chunkBytes) Close();
        }
    }

    public ChunkHashes Finish()
    {
        if (filled > 0) Close();
        return new ChunkHashes(chunkBytes, done);
    }

    void Close()
    {
        done.Add(Convert.ToHexStringLower(current.GetHashAndReset()));
        filled = 0;
    }
}

/// <summary>
/// Chunks a download has verified, kept so that consecutive reads of one chunk (the tensors of a rank file, in order)
/// read and hash it once: a few whole chunks, the least recently used dropped first. Keyed by the file, the chunk and
/// the hash it matched, so nothing but bytes that matched their manifest's hash is ever served from here.
/// </summary>
public sealed class VerifiedChunkCache
{
    /// <summary>Bytes held at most: four default 32 MiB chunks.</summary>
    public const long CapacityBytes = 128L << 20;

    readonly Lock gate = new();
    readonly LinkedList<(string Key, byte[] Bytes)> entries = new(); // most recently used first
    readonly Dictionary<string, Task<byte[]>> loading = new(StringComparer.Ordinal);
    long held;

    /// <summary>
    /// The cached bytes of <paramref name="key"/>, or those <paramref name="load"/> reads and verifies. Requests for a
    /// chunk that is being loaded wait for that load rather than reading and hashing the chunk again (a loader reads
    /// several tensors of one chunk at once). A load that fails fails its waiters too (a damaged chunk is damaged for
    /// all); one cancelled by the request that started it is started again by a waiter that was not cancelled.
    /// </summary>
    public async Task<byte[]> GetOrLoadAsync(string key, Func<Task<byte[]>> load, CancellationToken ct)
    {
        while (true)
        {
            Task<byte[]> pending;
            TaskCompletionSource<byte[]>? mine = null;
            lock (gate)
            {
                for (var node = entries.First; node is not null; node = node.Next)
                    if (node.Value.Key == key)
                    {
                        entries.Remove(node);
                        entries.AddFirst(node);
                        return node.Value.Bytes;
                    }
                if (!loading.TryGetValue(key, out pending!))
                {
                    mine = new TaskCompletionSource<byte[]>(TaskCreationOptions.RunContinuationsAsynchronously);
                    loading[key] = pending = mine.Task;
                }
            }
            if (mine is not null)
            {
                try
                {
                    var bytes = await load();
                    Put(key, bytes);
                    mine.SetResult(bytes);
                }
                catch (Exception e) { mine.SetException(e); }
                finally { lock (gate) loading.Remove(key); }
            }
            try { return await pending.WaitAsync(ct); }
            catch (OperationCanceledException) when (mine is null && !ct.IsCancellationRequested) { } // its starter was cancelled: load it here
        }
    }

    void Put(string key, byte[] bytes)
    {
        if (bytes.Length > CapacityBytes) return;
        lock (gate)
        {
            for (var node = entries.First; node is not null; node = node.Next)
                if (node.Value.Key == key) return;
            entries.AddFirst((key, bytes));
            held += bytes.Length;
            while (held > CapacityBytes && entries.Last is { } last)
            {
                held -= last.Value.Bytes.Length;
                entries.RemoveLast();
            }
        }
    }
}
