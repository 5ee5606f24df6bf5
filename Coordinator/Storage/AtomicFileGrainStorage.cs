// Grain state as one file per grain, where every write replaces the whole file at once (temporary file, then rename),
// so a Coordinator killed in the middle of a write leaves the previous state or the new one, never a torn file. Not a
// store for several silos: it is the single local silo's storage (Redis holds the state wherever several run).
//
// Orleans' own FileGrainStorage writes in place: the file is truncated, then the record is written after a thread-pool
// hop. A SIGKILL in that window left an empty record, and the restarted Coordinator aborted (exit code 134) reading it
// while it woke its jobs (docs/decisions.md, "Grain state files are replaced, never rewritten in place"). Records are
// laid out and named as that storage's are, so a state folder written before this one reads unchanged.
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using Orleans.Serialization.Serializers;
using Orleans.Storage;

namespace DeepSeekCluster.Coordinator.Storage;

public sealed class AtomicFileGrainStorage(string name, string rootDirectory, string serviceId, IGrainStorageSerializer serializer,
                                           IActivatorProvider activators) : IGrainStorage, ILifecycleParticipant<ISiloLifecycle>
{
    /// <summary>A record: this magic, the ETag as 16 GUID bytes, then the serialized state.</summary>
    static ReadOnlySpan<byte> Magic => "ORLFS001"u8;
    const int HeaderLength = 24;
    /// <summary>A replacement being written; one left behind by a kill is never read and is deleted at the next start.</summary>
    const string WritingSuffix = ".writing";

    public string RootDirectory { get; } = Path.GetFullPath(rootDirectory);

    public async Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        if (await ReadRecordAsync(RecordPath(stateName, grainId)).ConfigureAwait(false) is not { } record)
        {
            Reset(grainState);
            return;
        }
        grainState.State = serializer.Deserialize<T>(new BinaryData(record.Payload));
        grainState.ETag = record.ETag;
        grainState.RecordExists = true;
    }

    public async Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        string path = RecordPath(stateName, grainId);
        string? stored = await ReadETagAsync(path).ConfigureAwait(false);
        if (stored != grainState.ETag) throw Conflict<T>("WriteState", grainId, grainState.ETag, stored);
        var etag = Guid.NewGuid();
        byte[] payload = serializer.Serialize(grainState.State).ToArray();
        var record = new byte[HeaderLength + payload.Length];
        Magic.CopyTo(record);
        etag.TryWriteBytes(record.AsSpan(Magic.Length, 16));
        payload.CopyTo(record, HeaderLength);
        await ReplaceAsync(path, record).ConfigureAwait(false);
        grainState.ETag = etag.ToString("N");
        grainState.RecordExists = true;
    }

    public async Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        string path = RecordPath(stateName, grainId);
        if (await ReadETagAsync(path).ConfigureAwait(false) is { } stored)
        {
            if (stored != grainState.ETag) throw Conflict<T>("ClearState", grainId, grainState.ETag, stored);
            File.Delete(path);
        }
        Reset(grainState);
    }

    public void Participate(ISiloLifecycle lifecycle) =>
        lifecycle.Subscribe($"{nameof(AtomicFileGrainStorage)}-{name}", ServiceLifecycleStage.ApplicationServices, _ =>
        {
            Directory.CreateDirectory(RootDirectory);
            // No grain is active yet, so no write is under way: whatever is half-written was cut off by a kill.
            foreach (var orphan in Directory.EnumerateFiles(RootDirectory, "*" + WritingSuffix)) File.Delete(orphan);
            return Task.CompletedTask;
        });

    /// <summary>
    /// Writes the record beside its file and renames it over it: rename replaces atomically, so a reader (or a restart
    /// after a process kill) sees the old record or the new one. No fsync: it cost 10-100 ms a write on the loaded CI
    /// machine, in every grain turn that saves; a machine crash is left to the file system (ext4 flushes a file renamed
    /// over another before the rename) and, failing that, to the clear start-up error of a record that is not whole.
    /// </summary>
    static async Task ReplaceAsync(string path, byte[] record)
    {
        string writing = $"{path}.{Guid.NewGuid():N}{WritingSuffix}";
        try
        {
            await File.WriteAllBytesAsync(writing, record).ConfigureAwait(false);
            File.Move(writing, path, overwrite: true);
        }
        catch
        {
            File.Delete(writing);
            throw;
        }
    }

    async Task<(string ETag, ReadOnlyMemory<byte> Payload)?> ReadRecordAsync(string path)
    {
        byte[] bytes;
        try { bytes = await File.ReadAllBytesAsync(path).ConfigureAwait(false); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { return null; }
        return (ETagOf(path, bytes, bytes.Length), bytes.AsMemory(HeaderLength));
    }

    /// <summary>The stored record's ETag from its header alone (a write or clear checks it; the state is not read twice).</summary>
    async Task<string?> ReadETagAsync(string path)
    {
        var header = new byte[HeaderLength];
        int read;
        long length;
        try
        {
            await using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, bufferSize: 1, useAsync: true);
            length = file.Length;
            read = await file.ReadAtLeastAsync(header, HeaderLength, throwOnEndOfStream: false).ConfigureAwait(false);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { return null; }
        return ETagOf(path, header.AsSpan(0, read), length);
    }

    /// <summary>The ETag a record's header holds; a file that does not start with a whole header is named as not a record.</summary>
    string ETagOf(string path, ReadOnlySpan<byte> record, long fileLength)
    {
        if (record.Length < HeaderLength || !record[..Magic.Length].SequenceEqual(Magic))
            throw new InvalidDataException($"grain state file {path} ({fileLength} bytes) is not a record of storage '{name}': " +
                                           $"expected at least {HeaderLength} bytes starting with '{Encoding.ASCII.GetString(Magic)}'");
        return new Guid(record.Slice(Magic.Length, 16)).ToString("N");
    }

    void Reset<T>(IGrainState<T> grainState)
    {
        grainState.State = activators.GetActivator<T>().Create();
        grainState.ETag = null;
        grainState.RecordExists = false;
    }

    InconsistentStateException Conflict<T>(string operation, GrainId grainId, string? expected, string? stored) =>
        new($"{operation} of {typeof(T).Name} for {grainId} in storage '{name}': the file holds ETag {stored ?? "(none)"}, the grain expected {expected ?? "(none)"}",
            stored ?? "", expected ?? "");

    /// <summary>
    /// {RootDirectory}/{SHA-256 of the length-prefixed service id, grain type, grain key and state name, in hex}.grain: a
    /// name of fixed length whatever the key, and the one Orleans' FileGrainStorage uses.
    /// </summary>
    string RecordPath(string stateName, GrainId grainId)
    {
        var identity = new List<byte>();
        void Add(ReadOnlySpan<byte> part)
        {
            Span<byte> length = stackalloc byte[4];
            BinaryPrimitives.WriteInt32BigEndian(length, part.Length);
            identity.AddRange(length);
            identity.AddRange(part);
        }
        Add(Encoding.UTF8.GetBytes(serviceId));
        Add(grainId.Type.AsSpan());
        Add(grainId.Key.AsSpan());
        Add(Encoding.UTF8.GetBytes(stateName));
        return Path.Combine(RootDirectory, Convert.ToHexString(SHA256.HashData(identity.ToArray())) + ".grain");
    }
}
