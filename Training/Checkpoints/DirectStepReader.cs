// Reads a committed step's files straight into live CPU tensors: one pass per file, hashed on the way in (by chunk, in parallel, where the manifest allows).
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Security.Cryptography;
using DeepSeekCluster.Training.IO;
using Microsoft.Win32.SafeHandles;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>A source that can fill live tensors itself, without a new tensor per read (the folder backend).</summary>
public interface ICheckpointDirectSource : ICheckpointSource
{
    /// <summary>
    /// Reads every file of the committed <paramref name="manifest"/> once, front to back, writing each stored slice
    /// into its rows of <paramref name="destinations"/> (whole tensors by checkpoint name: contiguous, on the CPU, of the
    /// stored dtype and shape); stored tensors without a destination are read only to be hashed. Each file's hashes
    /// (its chunks' XXH128 or SHA-256 where the manifest has them, verified on several threads; else the whole file's SHA-256) are checked
    /// against the manifest while it streams. Header or size problems are found before any destination is written; a
    /// hash mismatch is found after, and the error says the destinations hold a partial load.
    /// </summary>
    Task ReadStepIntoAsync(CheckpointManifest manifest, IReadOnlyDictionary<string, Tensor> destinations, CancellationToken ct = default);
}

internal static class DirectStepReader
{
    /// <summary>Bytes per read call: large enough for the disk's full sequential speed, small enough to overlap reading and hashing.</summary>
    const int ChunkBytes = 8 << 20;

    /// <summary>Where one stored tensor's bytes go: a destination byte range, or nowhere (hash only).</summary>
    sealed record Region(string Name, long FileOffset, long Length, Tensor? Destination, long DestinationByteOffset)
    {
        public long End => FileOffset + Length;
    }

    sealed record FilePlan(string Path, ManifestFile File, byte[] Prefix, List<Region> Regions);

    public static async Task ReadAsync(string stepFolder, CheckpointManifest manifest, IReadOnlyDictionary<string, Tensor> destinations, CancellationToken ct)
    {
        SafeTensors.EnsureLittleEndian();
        string label = $"step {manifest.Step} of job '{manifest.Job}'";
        // Everything that can be checked without the tensor bytes is checked for every file before any destination is written.
        var plans = manifest.Files.Select(f => Plan(stepFolder, f, manifest, destinations, label)).ToList();
        var options = new ParallelOptions { CancellationToken = ct, MaxDegreeOfParallelism = Math.Clamp(Environment.ProcessorCount, 2, 8) };
        // Files with chunk hashes spread over the cores the concurrent files leave (at least two: one reads while one hashes).
        int workersPerFile = Math.Max(2, Environment.ProcessorCount / Math.Min(plans.Count, options.MaxDegreeOfParallelism));
        await System.Threading.Tasks.Parallel.ForEachAsync(plans, options, (plan, token) => new ValueTask(Task.Run(() =>
        {
            // XXH128 hashes far faster than a disk reads, so its threads mostly wait in pread: more of them keep more
            // reads in flight. SHA-256 chunks (older manifests) are CPU-bound: one thread per core.
            if (plan.File.ChunkHashes is { } chunks)
                StreamChunks(plan, chunks, label, chunks.Algorithm == ChunkHashAlgorithm.Xxh128 ? Math.Max(4, workersPerFile) : workersPerFile, token);
            else Stream(plan, label, token);
        }, token)));
    }

    static FilePlan Plan(string stepFolder, ManifestFile file, CheckpointManifest manifest, IReadOnlyDictionary<string, Tensor> destinations, string label)
    {
        if (Path.GetFileName(file.Name) != file.Name) throw new InvalidDataException($"{label}: checkpoint file name '{file.Name}' is not a bare file name");
        string path = Path.Combine(stepFolder, file.Name);
        var info = new FileInfo(path);
        if (!info.Exists) throw new FileNotFoundException($"{label}: {file.Name} is missing from {stepFolder}", path);
        if (info.Length != file.Size) throw new InvalidDataException($"{label}: {path} is {info.Length} bytes, the manifest says {file.Size}");

        byte[] prefix;
        IReadOnlyList<SafeTensorInfo> stored;
        using (var st = SafeTensors.Open(path))
        {
            stored = st.Tensors;
            using var raw = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
            Span<byte> len = stackalloc byte[8];
            RandomAccess.Read(raw, len, 0);
            prefix = new byte[8 + checked((int)BinaryPrimitives.ReadUInt64LittleEndian(len))];
            if (RandomAccess.Read(raw, prefix, 0) != prefix.Length) throw new InvalidDataException($"{label}: {path} ended inside its header");
        }
        long dataStart = prefix.Length;

        var expected = manifest.Tensors
            .SelectMany(kv => kv.Value.Slices.Where(s => s.File == file.Name).Select(s => (Name: kv.Key, Tensor: kv.Value, Slice: s)))
            .ToDictionary(e => e.Name, StringComparer.Ordinal);
        var regions = new List<Region>();
        foreach (var t in stored.OrderBy(t => t.Begin))
        {
            if (!expected.Remove(t.Name, out var e))
                throw new InvalidDataException($"{label}: {file.Name} holds tensor '{t.Name}', which the manifest does not place in it");
            long[] sliceShape = e.Tensor.Shape.Length == 0 ? [] : [e.Slice.RowCount, .. e.Tensor.Shape.AsSpan(1)];
            if (t.Dtype != e.Tensor.Dtype || !t.Shape.SequenceEqual(sliceShape))
                throw new InvalidDataException($"{label}: {file.Name} stores '{t.Name}' as {t.Dtype} [{string.Join(", ", t.Shape)}]; the manifest says {e.Tensor.Dtype} [{string.Join(", ", sliceShape)}]");
            if (!destinations.TryGetValue(t.Name, out var dest))
            {
                regions.Add(new Region(t.Name, dataStart + t.Begin, t.ByteLength, null, 0));
                continue;
            }
            if (dest.device_type != DeviceType.CPU || !dest.is_contiguous() || dest.dtype != t.ScalarType || !dest.shape.SequenceEqual(e.Tensor.Shape))
                throw new ArgumentException($"{label}: the destination of '{t.Name}' must be a contiguous CPU tensor of {e.Tensor.Dtype} [{string.Join(", ", e.Tensor.Shape)}]; " +
                    $"it is {dest.dtype} [{string.Join(", ", dest.shape)}] on {dest.device}");
            long rowBytes = e.Tensor.Rows == 0 ? 0 : dest.numel() * dest.ElementSize / e.Tensor.Rows;
            regions.Add(new Region(t.Name, dataStart + t.Begin, t.ByteLength, dest, e.Tensor.Shape.Length == 0 ? 0 : e.Slice.RowStart * rowBytes));
        }
        if (expected.Count > 0)
            throw new InvalidDataException($"{label}: the manifest places '{expected.Keys.First()}' in {file.Name}, which does not hold it ({expected.Count} missing)");
        return new FilePlan(path, file, prefix, regions);
    }

    /// <summary>
    /// One reader thread issues large sequential reads straight into the destinations; a hasher thread follows it
    /// chunk by chunk, so SHA-256 costs no second pass and overlaps the next read.
    /// </summary>
    static void Stream(FilePlan plan, string label, CancellationToken ct)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        hash.AppendData(plan.Prefix);
        using var chunks = new BlockingCollection<Chunk>(boundedCapacity: 4);
        var hasher = Task.Factory.StartNew(() =>
        {
            foreach (var c in chunks.GetConsumingEnumerable())
                using (c) hash.AppendData(c.Bytes);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

        Exception? failure = null;
        try
        {
            using var handle = File.OpenHandle(plan.Path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.SequentialScan);
            long position = plan.Prefix.Length;
            foreach (var r in plan.Regions)
            {
                if (r.FileOffset != position) // safetensors data is dense; a gap still counts for the hash
                    ReadScratch(handle, plan.Path, position, r.FileOffset - position, chunks, ct);
                if (r.Destination is null) ReadScratch(handle, plan.Path, r.FileOffset, r.Length, chunks, ct);
                else ReadInto(handle, plan.Path, r, chunks, ct);
                position = r.FileOffset + r.Length;
            }
            if (position != plan.File.Size) ReadScratch(handle, plan.Path, position, plan.File.Size - position, chunks, ct);
        }
        catch (Exception e) { failure = e; }
        finally
        {
            chunks.CompleteAdding();
            hasher.GetAwaiter().GetResult();
        }
        if (failure is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);

        string actual = Convert.ToHexStringLower(hash.GetHashAndReset());
        if (actual != plan.File.Sha256)
            throw new InvalidDataException($"{label}: {plan.Path} hashes to {actual}, the manifest says {plan.File.Sha256}; " +
                "the file is damaged and the model and optimizer now hold a partial load — do not train on them");
    }

    /// <summary>
    /// The file's chunks (<see cref="ManifestFile.ChunkHashes"/>) are read and verified by up to <paramref name="workers"/>
    /// threads at once, each reading its chunk front to back in 8 MiB reads straight into the destinations and hashing
    /// each read while it is still in the cache; while one thread hashes, another's read is in flight, so reading and
    /// verifying overlap. A mismatch names the file, the chunk and its byte range.
    /// </summary>
    static void StreamChunks(FilePlan plan, ChunkHashList chunks, string label, int workers, CancellationToken ct)
    {
        long chunkBytes = chunks.ChunkBytes;
        var hashes = chunks.Hashes;
        var segments = Segments(plan);
        using var handle = File.OpenHandle(plan.Path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.SequentialScan);
        int next = -1;
        var failures = new ConcurrentQueue<Exception>();
        void Worker()
        {
            byte[]? scratch = null;
            using var hash = chunks.NewHasher();
            for (int k; failures.IsEmpty && (k = Interlocked.Increment(ref next)) < hashes.Count;)
            {
                try
                {
                    long start = k * chunkBytes, end = Math.Min(start + chunkBytes, plan.File.Size);
                    ReadChunk(handle, plan, segments, start, end, hash, ref scratch, ct);
                    string actual = hash.FinishHex();
                    if (actual != hashes[k])
                        throw new InvalidDataException($"{label}: bytes [{start}, {end}) of {plan.Path} (chunk {k} of {hashes.Count}) hash to {actual} ({chunks.Label}), the manifest says {hashes[k]}; " +
                            "the file is damaged and the model and optimizer now hold a partial load — do not train on them");
                }
                catch (Exception e) { failures.Enqueue(e); }
            }
        }
        var threads = Enumerable.Range(1, Math.Max(0, Math.Min(workers, hashes.Count) - 1))
            .Select(_ => Task.Factory.StartNew(Worker, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToList();
        Worker(); // this thread is one of the workers
        Task.WaitAll(threads);
        if (failures.TryDequeue(out var first)) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(first);
    }

    /// <summary>The file after its header as consecutive regions: the tensors, and any gap between them as hash-only bytes.</summary>
    static List<Region> Segments(FilePlan plan)
    {
        var segments = new List<Region>();
        long position = plan.Prefix.Length;
        foreach (var r in plan.Regions)
        {
            if (r.FileOffset != position) segments.Add(new Region("(gap)", position, r.FileOffset - position, null, 0));
            segments.Add(r);
            position = r.End;
        }
        if (position != plan.File.Size) segments.Add(new Region("(tail)", position, plan.File.Size - position, null, 0));
        return segments;
    }

    /// <summary>Reads bytes [start, end) of the file into their destinations (the header from memory), hashing them in order.</summary>
    static void ReadChunk(SafeFileHandle handle, FilePlan plan, List<Region> segments, long start, long end, IChunkHash hash,
        ref byte[]? scratch, CancellationToken ct)
    {
        if (start < plan.Prefix.Length) hash.Append(plan.Prefix.AsSpan((int)start, (int)(Math.Min(end, plan.Prefix.Length) - start)));
        foreach (var r in segments)
        {
            if (r.End <= start || r.FileOffset >= end) continue;
            for (long at = Math.Max(start, r.FileOffset), until = Math.Min(end, r.End); at < until;)
            {
                ct.ThrowIfCancellationRequested();
                int n = (int)Math.Min(ChunkBytes, until - at);
                var target = r.Destination is null ? (scratch ??= new byte[ChunkBytes]).AsSpan(0, n) : DestinationBytes(r, at - r.FileOffset, n);
                FillExactly(handle, plan.Path, target, at);
                hash.Append(target);
                at += n;
            }
        }
    }

    /// <summary>
    /// Bytes [offset, offset + length) of a region's destination, at any byte (a chunk may end inside an element): a view
    /// of the elements that hold them, narrowed to the bytes. The view's span outlives the view: the storage is the live
    /// tensor's, which the caller keeps.
    /// </summary>
    static Span<byte> DestinationBytes(Region r, long offset, int length)
    {
        long element = r.Destination!.ElementSize, from = r.DestinationByteOffset + offset;
        if (r.DestinationByteOffset % element != 0 || r.Length % element != 0)
            throw new InvalidDataException($"tensor '{r.Name}' is {r.Length} bytes, not whole {element}-byte elements");
        long first = from / element, last = (from + length + element - 1) / element;
        using var flat = r.Destination.view(-1);
        using var view = flat.narrow(0, first, last - first);
        var (address, _) = NativeSpan.Of(view.bytes);
        return NativeSpan.At(address + (nint)(from - first * element), length);
    }

    static void ReadInto(SafeFileHandle handle, string path, Region r, BlockingCollection<Chunk> chunks, CancellationToken ct)
    {
        using var flat = r.Destination!.view(-1);
        long element = r.Destination.ElementSize;
        if (r.DestinationByteOffset % element != 0 || r.Length % element != 0)
            throw new InvalidDataException($"{path}: tensor '{r.Name}' is {r.Length} bytes, not whole {element}-byte elements");
        long perChunk = Math.Max(1, ChunkBytes / element), first = r.DestinationByteOffset / element, count = r.Length / element;
        for (long done = 0; done < count; done += perChunk)
        {
            ct.ThrowIfCancellationRequested();
            var part = flat.narrow(0, first + done, Math.Min(perChunk, count - done));
            try
            {
                FillExactly(handle, path, part.bytes, r.FileOffset + done * element);
                chunks.Add(new Chunk(part, null), ct);
            }
            catch
            {
                part.Dispose();
                throw;
            }
        }
    }

    static void ReadScratch(SafeFileHandle handle, string path, long offset, long length, BlockingCollection<Chunk> chunks, CancellationToken ct)
    {
        for (long done = 0; done < length;)
        {
            ct.ThrowIfCancellationRequested();
            var buffer = new byte[(int)Math.Min(ChunkBytes, length - done)];
            FillExactly(handle, path, buffer, offset + done);
            chunks.Add(new Chunk(null, buffer), ct);
            done += buffer.Length;
        }
    }

    static void FillExactly(SafeFileHandle handle, string path, Span<byte> target, long offset)
    {
        while (!target.IsEmpty)
        {
            int n = RandomAccess.Read(handle, target, offset);
            if (n == 0) throw new InvalidDataException($"{path} ended at byte {offset}; it was truncated while being read");
            target = target[n..];
            offset += n;
        }
    }

    /// <summary>Bytes the hasher still has to see: a view of a destination (disposed after hashing) or a scratch buffer.</summary>
    sealed class Chunk(Tensor? view, byte[]? scratch) : IDisposable
    {
        public ReadOnlySpan<byte> Bytes => view is not null ? view.bytes : scratch;
        public void Dispose() => view?.Dispose();
    }
}
