// Blob backend over a local folder: the embedded default when no blob endpoint is configured.
using System.Text.Json;

namespace DeepSeekCluster.CheckpointStore.Storage;

/// <summary>
/// A key is a file under <see cref="Location"/>. Staged bytes live in a hidden sibling
/// <c>.{name}.{stageId}.partial</c> that is renamed over the final name on commit; metadata lives in
/// a hidden sibling <c>.{name}.meta.json</c>. Renames within one folder are atomic, so a reader sees
/// either the old blob, the new one, or none — never a prefix.
/// </summary>
public sealed class FolderBlobBackend : IBlobBackend
{
    private const string PartialSuffix = ".partial";
    private const string MetaSuffix = ".meta.json";

    public FolderBlobBackend(string folder)
    {
        Location = Path.GetFullPath(folder);
        Directory.CreateDirectory(Location);
    }

    public string Location { get; }

    public Task<long> GetStagedLengthAsync(string key, string stageId, CancellationToken ct)
    {
        var partial = new FileInfo(PartialPath(key, stageId));
        return Task.FromResult(partial.Exists ? partial.Length : 0L);
    }

    public async Task AppendStagedAsync(string key, string stageId, long offset, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        string partial = PartialPath(key, stageId);
        Directory.CreateDirectory(Path.GetDirectoryName(partial)!);
        await using var stream = new FileStream(partial, FileMode.OpenOrCreate, FileAccess.Write, FileShare.None, bufferSize: 0);
        if (stream.Length != offset)
            throw new InvalidOperationException($"Staged bytes of '{key}' end at {stream.Length}, not at the append offset {offset}.");
        stream.Position = offset;
        await stream.WriteAsync(data, ct);
    }

    public Task CommitStagedAsync(string key, string stageId, long length, IReadOnlyDictionary<string, string> metadata, CancellationToken ct)
    {
        string partial = PartialPath(key, stageId);
        string final = FullPath(key);
        using (var stream = new FileStream(partial, FileMode.Open, FileAccess.ReadWrite, FileShare.None))
        {
            if (stream.Length != length)
                throw new InvalidOperationException($"Staged bytes of '{key}' are {stream.Length} long, not the {length} to commit.");
            stream.Flush(flushToDisk: true); // the rename must not publish bytes that are only in the page cache
        }
        WriteMetadata(final, metadata);
        File.Move(partial, final, overwrite: true);
        foreach (var other in OtherPartials(final)) TryDelete(other);
        return Task.CompletedTask;
    }

    public async Task<bool> PutAsync(string key, ReadOnlyMemory<byte> data, IReadOnlyDictionary<string, string> metadata, bool onlyIfAbsent, CancellationToken ct)
    {
        string final = FullPath(key);
        Directory.CreateDirectory(Path.GetDirectoryName(final)!);
        string temp = Path.Combine(Path.GetDirectoryName(final)!, $".{Path.GetFileName(final)}.{Guid.NewGuid():N}.tmp");
        try
        {
            await using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0))
            {
                await stream.WriteAsync(data, ct);
                stream.Flush(flushToDisk: true);
            }
            if (onlyIfAbsent)
            {
                // Without overwrite the move fails if the target exists, so of two racing writers exactly one wins.
                try { File.Move(temp, final, overwrite: false); }
                catch (IOException) when (File.Exists(final)) { return false; }
            }
            else
            {
                File.Move(temp, final, overwrite: true);
            }
            if (metadata.Count > 0) WriteMetadata(final, metadata);
            return true;
        }
        finally
        {
            TryDelete(temp);
        }
    }

    public Task SetMetadataAsync(string key, IReadOnlyDictionary<string, string> metadata, CancellationToken ct)
    {
        string final = FullPath(key);
        if (!File.Exists(final)) throw new FileNotFoundException($"No blob '{key}' under {Location} to set metadata on.", final);
        WriteMetadata(final, metadata);
        return Task.CompletedTask;
    }

    public Task<BlobEntry?> GetInfoAsync(string key, CancellationToken ct)
    {
        var file = new FileInfo(FullPath(key));
        return Task.FromResult(file.Exists ? new BlobEntry(key, file.Length, ReadMetadata(file.FullName)) : null);
    }

    public async Task ReadAsync(string key, long offset, Memory<byte> buffer, CancellationToken ct)
    {
        using var handle = File.OpenHandle(FullPath(key), FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
        while (!buffer.IsEmpty)
        {
            int n = await RandomAccess.ReadAsync(handle, buffer, offset, ct);
            if (n == 0) throw new EndOfStreamException($"Blob '{key}' under {Location} ended at byte {offset}.");
            buffer = buffer[n..];
            offset += n;
        }
    }

    public Task<IReadOnlyList<BlobEntry>> ListAsync(string prefix, bool includeStaged, CancellationToken ct)
    {
        var result = new List<BlobEntry>();
        // The prefix is a folder path plus the start of a name; search from the deepest folder it names.
        int slash = prefix.LastIndexOf('/');
        string folder = slash < 0 ? Location : Path.Combine(Location, prefix[..slash]);
        if (!Directory.Exists(folder)) return Task.FromResult<IReadOnlyList<BlobEntry>>(result);

        var staged = new HashSet<string>(StringComparer.Ordinal);
        foreach (var path in Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories))
        {
            string name = Path.GetFileName(path);
            string dir = Path.GetRelativePath(Location, Path.GetDirectoryName(path)!).Replace(Path.DirectorySeparatorChar, '/');
            string keyDir = dir == "." ? "" : dir + "/";
            if (!name.StartsWith('.'))
            {
                string key = keyDir + name;
                if (key.StartsWith(prefix, StringComparison.Ordinal))
                    result.Add(new BlobEntry(key, new FileInfo(path).Length, ReadMetadata(path)));
            }
            else if (includeStaged && name.EndsWith(PartialSuffix, StringComparison.Ordinal))
            {
                // .{name}.{stageId}.partial: the stage id has no dots, so the key name is what lies between.
                string inner = name[1..^PartialSuffix.Length];
                int dot = inner.LastIndexOf('.');
                string key = keyDir + (dot < 0 ? inner : inner[..dot]);
                if (key.StartsWith(prefix, StringComparison.Ordinal) && !File.Exists(FullPath(key)) && staged.Add(key))
                    result.Add(new BlobEntry(key, -1, new Dictionary<string, string>()));
            }
        }
        result.Sort((a, b) => string.CompareOrdinal(a.Key, b.Key));
        return Task.FromResult<IReadOnlyList<BlobEntry>>(result);
    }

    public Task DeleteAsync(string key, CancellationToken ct)
    {
        string final = FullPath(key);
        foreach (var partial in OtherPartials(final)) File.Delete(partial);
        File.Delete(MetaPath(final));
        File.Delete(final); // File.Delete ignores a missing file
        string? dir = Path.GetDirectoryName(final);
        try
        {
            if (dir is not null && dir != Location && !Directory.EnumerateFileSystemEntries(dir).Any()) Directory.Delete(dir);
        }
        catch (IOException) { } // a writer created a file in it meanwhile: the folder stays
        return Task.CompletedTask;
    }

    // ---- Paths ----

    private string FullPath(string key) => Path.Combine(Location, key.Replace('/', Path.DirectorySeparatorChar));

    private string PartialPath(string key, string stageId)
    {
        string final = FullPath(key);
        return Path.Combine(Path.GetDirectoryName(final)!, $".{Path.GetFileName(final)}.{stageId}{PartialSuffix}");
    }

    private static string MetaPath(string final) => Path.Combine(Path.GetDirectoryName(final)!, $".{Path.GetFileName(final)}{MetaSuffix}");

    private static IEnumerable<string> OtherPartials(string final)
    {
        string dir = Path.GetDirectoryName(final)!;
        return Directory.Exists(dir)
            ? Directory.GetFiles(dir, $".{Path.GetFileName(final)}.*{PartialSuffix}")
            : [];
    }

    private static void WriteMetadata(string final, IReadOnlyDictionary<string, string> metadata)
    {
        string meta = MetaPath(final);
        string temp = meta + $".{Guid.NewGuid():N}.tmp";
        File.WriteAllBytes(temp, JsonSerializer.SerializeToUtf8Bytes(metadata));
        File.Move(temp, meta, overwrite: true);
    }

    private static IReadOnlyDictionary<string, string> ReadMetadata(string final)
    {
        string meta = MetaPath(final);
        if (!File.Exists(meta)) return new Dictionary<string, string>();
        return JsonSerializer.Deserialize<Dictionary<string, string>>(File.ReadAllBytes(meta)) ?? new Dictionary<string, string>();
    }

    private static void TryDelete(string path)
    {
        try { File.Delete(path); }
        catch (IOException) { } // a leftover temp file is hidden and harmless; the original outcome matters more
        catch (UnauthorizedAccessException) { }
    }
}
