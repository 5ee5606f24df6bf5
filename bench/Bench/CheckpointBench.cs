// Checkpoint benchmark: sharded save/load MB/s on the folder backend beside the disk's own sequential speed, and the step stall of an async save.
using System.Diagnostics;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class CheckpointBench
{
    public static void Run(string[] args)
    {
        string preset = Arg(args, "--preset", "small");
        string dir = Arg(args, "--dir", Path.Combine(Path.GetTempPath(), "deepseek-ckpt-bench"));
        int diskMb = int.Parse(Arg(args, "--disk-mb", "1024"));
        int dp = int.Parse(Arg(args, "--dp", "4")), pp = int.Parse(Arg(args, "--pp", "2"));
        int repeats = int.Parse(Arg(args, "--repeats", "3"));
        if (Directory.Exists(dir)) Directory.Delete(dir, true);
        Directory.CreateDirectory(dir);

        Console.WriteLine($"# DeepSeekCluster checkpoint benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        bool canDrop = Arg(args, "--drop-cache", "true") == "true" && DropPageCache();
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores; folder {dir}; page cache drop before reads: {(canDrop ? "yes" : "not permitted — reads may come from the page cache")}");

        // ---- The disk's physical limit: one large sequential file, fsynced; read again beside every load ----
        string probe = Path.Combine(dir, "disk-probe.bin");
        var (diskWrite, diskRead) = DiskSpeed(probe, diskMb, canDrop);
        Console.WriteLine($"disk sequential ({diskMb} MB, FileStream + fsync): write {diskWrite:F0} MB/s, read {diskRead:F0} MB/s; load average {LoadAverage()}");
        // A load checks SHA-256s as it streams: one core's hashing bounds a file verified whole; chunk hashes spread it.
        Console.WriteLine($"SHA-256 (.NET, OpenSSL; 256 MB in memory): one core {HashSpeed(1):F0} MB/s, {Environment.ProcessorCount} threads {HashSpeed(Environment.ProcessorCount):F0} MB/s");
        Console.WriteLine();

        // ---- The model and optimizer state of the preset ----
        manual_seed(1);
        using var model = new DeepSeekForCausalLM(DeepSeekConfig.Preset(preset)).InitializeWeights();
        using var optimizer = new AdamW(model.named_parameters().Select(p => (model.ToHfName(p.name), (Tensor)p.parameter)));
        using (no_grad())
            foreach (var s in optimizer.Slots) { s.ExpAvg.normal_(); s.ExpAvgSq.uniform_(0, 1); }
        var tensors = CheckpointTensors.Collect(model, optimizer);
        double mb = tensors.Sum(kv => kv.Value.numel() * kv.Value.ElementSize) / 1e6;
        Console.WriteLine($"state of preset '{preset}': {tensors.Count} tensors, {mb:F0} MB (weights + routing biases + AdamW moments)");
        Console.WriteLine();
        // On a shared machine the disk's speed moves from minute to minute, so each save (load) is compared with a write
        // (read) of the probe file taken just before it, under the same conditions; the best pair is reported.
        Console.WriteLine($"| layout | save MB/s | disk write MB/s just before | save % of disk write | load MB/s{(canDrop ? ", page cache dropped" : "")} | disk read MB/s just before | load % of disk read | load MB/s from the page cache | save s | load s |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|");
        long step = 0;
        // Chunk hashes (the folder store's default) let one file verify on every core; "whole-file hash" is what a
        // manifest without them (older, or from the gRPC store) costs.
        // The variants take turns within each repeat, so a change in the machine's load hits them alike.
        var variants = new[] { (D: 1, P: 1, Chunked: true), (D: 1, P: 1, Chunked: false), (D: dp, P: pp, Chunked: true), (D: dp, P: pp, Chunked: false) };
        var best = variants.Select(_ => new Best()).ToArray();
        for (int i = 0; i < repeats; i++)
            for (int v = 0; v < variants.Length; v++)
            {
                var (d, p, chunked) = variants[v];
                var b = best[v];
                step++;
                var layout = ParallelLayout.Even(d, p, model.Config.NumHiddenLayers);
                using var store = new FolderCheckpointStore(dir, "bench") { HashChunkBytes = chunked ? ManifestFile.DefaultChunkBytes : null };
                double written = WriteSpeed(probe, diskMb);
                var sw = Stopwatch.StartNew();
                ShardedCheckpointWriter.SaveAllRanksAsync(store, "bench", layout, tensors, new CheckpointPosition(step, 0, 0, 0), model.Config.ToJson(), null)
                    .GetAwaiter().GetResult();
                double save = sw.Elapsed.TotalSeconds;
                b.Save = Math.Min(b.Save, save);
                if (mb / save / written > b.SaveRatio) (b.SaveRatio, b.WriteBeside) = (mb / save / written, written);
                double read = ReadSpeed(probe, canDrop);
                if (canDrop) DropPageCache();
                sw.Restart();
                ShardedCheckpointLoader.LoadReplicaAsync(store, step, model, optimizer).GetAwaiter().GetResult();
                double load = sw.Elapsed.TotalSeconds;
                b.Load = Math.Min(b.Load, load);
                if (mb / load / read > b.LoadRatio) (b.LoadRatio, b.ReadBeside) = (mb / load / read, read);
                sw.Restart(); // the same files again, now in the page cache: what the loader costs beyond the disk
                ShardedCheckpointLoader.LoadReplicaAsync(store, step, model, optimizer).GetAwaiter().GetResult();
                b.Warm = Math.Min(b.Warm, sw.Elapsed.TotalSeconds);
                Directory.Delete(store.StepFolder(step), true);
            }
        for (int v = 0; v < variants.Length; v++)
        {
            var ((d, p, chunked), b) = (variants[v], best[v]);
            Console.WriteLine($"| dp {d} x pp {p} ({d * p} files{(chunked ? ", 32 MiB chunk hashes" : ", whole-file hash")}) | {mb / b.Save:F0} | {b.WriteBeside:F0} | {100 * b.SaveRatio:F0}% | {mb / b.Load:F0} | {b.ReadBeside:F0} | {100 * b.LoadRatio:F0}% | {mb / b.Warm:F0} | {b.Save:F2} | {b.Load:F2} |");
        }
        Console.WriteLine($"load average after the saves and loads: {LoadAverage()}");
        Console.WriteLine();

        // ---- Step stall: time the training thread spends in an async save vs in a blocking one (one rank, dp 1 x pp 1) ----
        // One saver for all saves, as in training: its first save allocates the host copies, the later ones refill them.
        var single = new ShardingPlan(ParallelLayout.Even(1, 1, model.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        var byName = tensors.ToDictionary();
        using var blockingStore = new FolderCheckpointStore(dir, "blocking");
        using var asyncStore = new FolderCheckpointStore(dir, "async");
        double blocking = double.MaxValue, firstStall = 0, stall = double.MaxValue, background = double.MaxValue;
        var saver = new AsyncCheckpointSaver(asyncStore, single, 0);
        for (int i = 0; i <= repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            ShardedCheckpointWriter.WriteRank(blockingStore, single, 0, i, byName);
            blocking = Math.Min(blocking, sw.Elapsed.TotalSeconds);
            Directory.Delete(blockingStore.StepFolder(i), true);

            using (no_grad()) foreach (var s in optimizer.Slots) s.ExpAvg.mul_(0.9); // a training step changes the state between saves
            var request = saver.Save(i, byName);
            var failure = saver.WaitAsync().GetAwaiter().GetResult();
            if (!request.Started || failure is not null) throw new InvalidOperationException($"async save {i} failed: {failure?.Message}");
            if (i == 0) firstStall = request.Stall.TotalSeconds;
            else stall = Math.Min(stall, request.Stall.TotalSeconds);
            background = Math.Min(background, saver.LastOutcome!.Duration.TotalSeconds);
            Directory.Delete(asyncStore.StepFolder(i), true);
        }
        saver.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Console.WriteLine("| save of one rank's state | training-thread stall s | background write s |");
        Console.WriteLine("|---|---|---|");
        Console.WriteLine($"| blocking (best of {repeats + 1}) | {blocking:F3} | — |");
        Console.WriteLine($"| async, first save (allocates the host copies) | {firstStall:F3} ({100 * firstStall / blocking:F1}% of blocking) | — |");
        Console.WriteLine($"| async, later saves (refill them; best of {repeats}) | {stall:F3} ({100 * stall / blocking:F1}% of blocking) | {background:F3} |");
        Console.WriteLine();
        Console.WriteLine($"load average at the end: {LoadAverage()}");
        Directory.Delete(dir, true);
    }

    /// <summary>The best of the repeats of one variant: shortest times, and the best ratio to the disk with the disk's speed beside it.</summary>
    sealed class Best
    {
        public double Save = double.MaxValue, Load = double.MaxValue, Warm = double.MaxValue, SaveRatio, WriteBeside, LoadRatio, ReadBeside;
    }

    /// <summary>Writes then reads one file of <paramref name="mb"/> MB in 64 MiB blocks; returns MB/s. The write includes the fsync.</summary>
    static (double Write, double Read) DiskSpeed(string path, int mb, bool drop) => (WriteSpeed(path, mb), ReadSpeed(path, drop));

    /// <summary>Writes <paramref name="mb"/> MB in 64 MiB blocks and fsyncs; MB/s.</summary>
    static double WriteSpeed(string path, int mb)
    {
        var block = new byte[64 << 20];
        new Random(1).NextBytes(block);
        long total = (long)mb * 1_000_000;
        var sw = Stopwatch.StartNew();
        using (var fs = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 0))
        {
            for (long done = 0; done < total; done += block.Length) fs.Write(block, 0, (int)Math.Min(block.Length, total - done));
            fs.Flush(flushToDisk: true);
        }
        return mb / sw.Elapsed.TotalSeconds;
    }

    /// <summary>Reads the whole file in 64 MiB blocks from a dropped page cache (when allowed); MB/s.</summary>
    static double ReadSpeed(string path, bool drop)
    {
        var block = new byte[64 << 20];
        if (drop) DropPageCache();
        var sw = Stopwatch.StartNew();
        long total = 0;
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0))
            for (int n; (n = fs.Read(block, 0, block.Length)) > 0;) total += n;
        return total / 1e6 / sw.Elapsed.TotalSeconds;
    }

    /// <summary>SHA-256 of 256 MB split over <paramref name="threads"/> threads; MB/s.</summary>
    static double HashSpeed(int threads)
    {
        var data = new byte[256 << 20];
        new Random(2).NextBytes(data);
        int part = data.Length / threads;
        var sw = Stopwatch.StartNew();
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, i => System.Security.Cryptography.SHA256.HashData(data.AsSpan(i * part, part)));
        return (long)part * threads / 1e6 / sw.Elapsed.TotalSeconds;
    }

    static string LoadAverage()
    {
        try { return string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)); }
        catch (IOException) { return "unknown"; }
    }

    /// <summary>Writes back dirty pages and drops the page cache (needs root and a writable /proc/sys); false when not allowed.</summary>
    static bool DropPageCache()
    {
        try
        {
            using (var sync = Process.Start("sync")!) sync.WaitForExit();
            File.WriteAllText("/proc/sys/vm/drop_caches", "3");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.ComponentModel.Win32Exception)
        {
            return false;
        }
    }

    static string Arg(string[] args, string name, string fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
    }
}
