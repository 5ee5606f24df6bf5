// Where an async checkpoint save's time and CPU go, piece by piece, with no training step beside it: the floor of its stall.
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using DeepSeekCluster.Training.Checkpoints;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// The parts of one rank's save, each timed alone on an otherwise idle process (wall and this thread's CPU time): the
/// refill of the host copies (the only part the training thread must wait for), the whole-file SHA-256, the chunk
/// XXH128s, the write into the page cache and the fsync; then the saver's whole background write and a blocking save.
/// On a machine whose cores the step uses, every CPU second of the save comes out of the steps beside it, so the sum of
/// the CPU parts is what no scheduling can hide; the fsync's wait is what an async save does hide.
/// </summary>
static class CheckpointCostBench
{
    [DllImport("libc")]
    static extern int clock_gettime(int clock, out Timespec ts);

    [StructLayout(LayoutKind.Sequential)]
    struct Timespec { public long Seconds, Nanoseconds; }

    /// <summary>CPU seconds of the calling thread (CLOCK_THREAD_CPUTIME_ID).</summary>
    internal static double ThreadCpu()
    {
        if (clock_gettime(3, out var ts) != 0) throw new IOException("clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
        return ts.Seconds + ts.Nanoseconds / 1e9;
    }

    static double ProcessCpu() => Process.GetCurrentProcess().TotalProcessorTime.TotalSeconds;

    /// <summary>Each tensor's bytes in order, in spans of at most 64 MiB (a span cannot cover 2 GiB).</summary>
    delegate void SpanAction(ReadOnlySpan<byte> bytes);

    static void ForEachSpan(IEnumerable<Tensor> tensors, SpanAction visit)
    {
        foreach (var t in tensors)
        {
            long n = t.numel();
            if (n == 0) continue;
            using var flat = t.reshape(-1);
            long per = Math.Max(1, (64L << 20) / t.ElementSize);
            for (long i = 0; i < n; i += per)
            {
                using var part = flat.narrow(0, i, Math.Min(per, n - i));
                visit(part.bytes);
            }
        }
    }

    public static void Run(ShardingPlan plan, IReadOnlyDictionary<string, Tensor> live, string dir, int repeats, Action<string> log)
    {
        using var store = new FolderCheckpointStore(dir, "cost") { HashChunkBytes = ManifestFile.DefaultChunkBytes };
        var snapshot = ShardedCheckpointWriter.CopyToHost(plan, 0, 0, live); // allocates and faults in: later refills are what a save costs
        double mb = snapshot.Bytes / 1e6;
        string file = Path.Combine(dir, "cost-probe.bin");
        var rows = new List<string[]>();
        var parts = new Dictionary<string, List<(double Wall, double Cpu)>>();
        void Add(string name, double wall, double cpu)
        {
            if (!parts.TryGetValue(name, out var list)) parts[name] = list = [];
            list.Add((wall, cpu));
        }
        (double Wall, double Cpu) Timed(Action a)
        {
            double c = ThreadCpu();
            var sw = Stopwatch.StartNew();
            a();
            return (sw.Elapsed.TotalSeconds, ThreadCpu() - c);
        }
        for (int r = 0; r < repeats; r++)
        {
            long step = 10 + r;
            var (w, c) = Timed(() => snapshot = ShardedCheckpointWriter.CopyToHost(plan, 0, step, live, snapshot));
            Add("refill the host copies (memcpy; the training thread waits for this part)", w, c);
            var tensors = snapshot.Slices.Select(kv => kv.Value).ToList();
            (w, c) = Timed(() => { using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256); ForEachSpan(tensors, b => h.AppendData(b)); h.GetHashAndReset(); });
            Add("whole-file SHA-256", w, c);
            (w, c) = Timed(() => { using var h = new ChunkHasher(ManifestFile.DefaultChunkBytes); ForEachSpan(tensors, b => h.Append(b)); h.Finish(); });
            Add("32 MiB chunk XXH128s", w, c);
            FileStream? fs = null;
            (w, c) = Timed(() => { fs = new FileStream(file, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 0); ForEachSpan(tensors, b => fs!.Write(b)); });
            Add("write() into the page cache", w, c);
            (w, c) = Timed(() => { fs!.Flush(flushToDisk: true); fs.Dispose(); });
            Add("fsync (the disk; the kernel's writeback CPU is not this thread's)", w, c);
            File.Delete(file);
            // The three passes over the bytes one 64 MiB span at a time (each pass reads it from memory again) against
            // each 256 KiB piece hashed twice and written while it is still in the core's cache (RankFileWriter's way).
            foreach (int piece in new[] { 64 << 20, 256 << 10 })
            {
                (w, c) = Timed(() =>
                {
                    using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                    using var xxh = new ChunkHasher(ManifestFile.DefaultChunkBytes);
                    using var f = new FileStream(file, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 0);
                    ForEachSpan(tensors, b =>
                    {
                        for (int at = 0; at < b.Length; at += piece)
                        {
                            var p = b.Slice(at, Math.Min(piece, b.Length - at));
                            sha.AppendData(p);
                            xxh.Append(p);
                            f.Write(p);
                        }
                    });
                    sha.GetHashAndReset();
                    xxh.Finish();
                });
                Add($"SHA-256 + XXH128 + write(), {(piece >> 20 > 0 ? $"{piece >> 20} MiB" : $"{piece >> 10} KiB")} at a time (no fsync)", w, c);
                File.Delete(file);
            }
            var byName = snapshot.Slices.ToDictionary();
            // (O_DIRECT writes from an aligned staging buffer were measured beside these at commit 8aeda64: docs/benchmarks.md.)
            double pc = ProcessCpu();
            (w, c) = Timed(() => ShardedCheckpointWriter.WriteRank(store, plan, 0, step, byName));
            Add("the saver's background write from the host copies (hashes + write + fsync)", w, c);
            Add("  same, the process's CPU (all its threads)", w, ProcessCpu() - pc);
            Directory.Delete(store.StepFolder(step), true);
            (w, c) = Timed(() => ShardedCheckpointWriter.WriteRank(store, plan, 0, step + 100, live));
            Add("blocking save from the live tensors (the reference)", w, c);
            Directory.Delete(store.StepFolder(step + 100), true);
            log($"  {DateTime.UtcNow:HH:mm:ss} cost repeat {r + 1}: " + string.Join("; ", parts.Select(kv => $"{kv.Key.Split(' ')[0]} {kv.Value[^1].Wall:F2}/{kv.Value[^1].Cpu:F2}")));
        }
        snapshot.Dispose();
        Console.WriteLine($"parts of one rank's save ({mb:F0} MB), each alone, no training step beside it; {repeats} repeats; wall s / this thread's CPU s, min–max:");
        Console.WriteLine();
        Console.WriteLine("| part | wall s | CPU s | MB/s (wall, median) |");
        Console.WriteLine("|---|---|---|---|");
        foreach (var (name, list) in parts)
            Console.WriteLine($"| {name} | {list.Min(x => x.Wall):F2}–{list.Max(x => x.Wall):F2} | {list.Min(x => x.Cpu):F2}–{list.Max(x => x.Cpu):F2} | {mb / Median(list.Select(x => x.Wall)):F0} |");
        Console.WriteLine();
    }

    static double Median(IEnumerable<double> values)
    {
        var s = values.Order().ToArray();
        return s.Length == 0 ? double.NaN : s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }
}
