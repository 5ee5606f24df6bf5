// Checkpoint benchmark: sharded save/load MB/s on the folder backend beside the disk's own sequential speed, and the step stall of an async save.
using System.Diagnostics;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
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
        // "throughput" (save and load MB/s against the disk), "stall" (a save's cost to the training steps), or both.
        var parts = Arg(args, "--parts", "throughput,stall").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToHashSet();
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
        Console.WriteLine($"SHA-256 (.NET, OpenSSL; 256 MB in memory): one core {HashSpeed(1, false):F0} MB/s, {Environment.ProcessorCount} threads {HashSpeed(Environment.ProcessorCount, false):F0} MB/s; " +
                          $"XXH128 (System.IO.Hashing): one core {HashSpeed(1, true):F0} MB/s");
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
        if (parts.Contains("throughput"))
        {
            // On a shared machine the disk's speed moves from minute to minute, so each save (load) is compared with a write
            // (read) of the probe file taken just before it, under the same conditions; the best pair is reported.
            Console.WriteLine($"| layout | save MB/s | disk write MB/s just before | save % of disk write | load MB/s{(canDrop ? ", page cache dropped" : "")} | disk read MB/s just before | load % of disk read | load MB/s from the page cache | save s | load s |");
            Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|");
            long step = 0;
            // Chunk hashes (the folder store's default: XXH128) let one file verify on every core at memory speed; "SHA-256
            // chunks" is what the store wrote before (the baseline), "whole-file hash" what a manifest without chunk hashes costs.
            // The variants take turns within each repeat, so a change in the machine's load hits them alike.
            var variants = new[]
            {
                (D: 1, P: 1, Chunks: (ChunkHashAlgorithm?)ChunkHashAlgorithm.Xxh128), (D: 1, P: 1, Chunks: ChunkHashAlgorithm.Sha256), (D: 1, P: 1, Chunks: null),
                (D: dp, P: pp, Chunks: ChunkHashAlgorithm.Xxh128), (D: dp, P: pp, Chunks: ChunkHashAlgorithm.Sha256), (D: dp, P: pp, Chunks: null),
            };
            var best = variants.Select(_ => new Best()).ToArray();
            for (int i = 0; i < repeats; i++)
                for (int v = 0; v < variants.Length; v++)
                {
                    var (d, p, chunks) = variants[v];
                    var b = best[v];
                    step++;
                    var layout = ParallelLayout.Even(d, p, model.Config.NumHiddenLayers);
                    using var store = new FolderCheckpointStore(dir, "bench")
                    {
                        HashChunkBytes = chunks is null ? null : ManifestFile.DefaultChunkBytes, HashChunkAlgorithm = chunks ?? ChunkHashAlgorithm.Xxh128,
                    };
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
                var ((d, p, chunks), b) = (variants[v], best[v]);
                string hashes = chunks switch { ChunkHashAlgorithm.Xxh128 => "32 MiB chunk XXH128", ChunkHashAlgorithm.Sha256 => "32 MiB chunk SHA-256 (before)", _ => "whole-file SHA-256 only" };
                Console.WriteLine($"| dp {d} x pp {p} ({d * p} files, {hashes}) | {mb / b.Save:F0} | {b.WriteBeside:F0} | {100 * b.SaveRatio:F0}% | {mb / b.Load:F0} | {b.ReadBeside:F0} | {100 * b.LoadRatio:F0}% | {mb / b.Warm:F0} | {b.Save:F2} | {b.Load:F2} |");
            }
            Console.WriteLine($"load average after the saves and loads: {LoadAverage()}");
            Console.WriteLine();

        }

        if (parts.Contains("stall"))
        {
            // ---- Step stall: what a save adds to the training steps around it, against a blocking save (one rank, dp 1 x pp 1) ----
            // Real training steps of the same model (the Trainer with its own AdamW, one small micro-batch), so the background
            // copy really overlaps a forward and backward pass. Per repeat, in turns: two plain steps (the baseline: the faster
            // one), a blocking save (the rank file written from the live tensors, then the next step), Save (the copy at the step
            // boundary, then the next step) and BeginSave (the copy beside the next step's forward/backward, which waits for it
            // before the optimizer update). The stall of a save = the wall time of the save call plus the next step, minus the
            // plain step; the blocking save's own time is the reference. Each save's background write finishes before the next
            // measurement (waited for and timed separately): on this CPU-only machine it competes with the steps for the cores.
            var stepOptions = new TrainingOptions { SeqLen = 64, GlobalBatch = 2, MicroBatch = 2, Steps = 100_000, WarmupSteps = 1 };
            var rng = new Random(1);
            var tokens = new int[(stepOptions.SeqLen + 1) * 256];
            for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(model.Config.VocabSize);
            using var trainer = new Trainer(model, new Training.Data.TokenDataset(tokens, stepOptions.SeqLen), null, stepOptions, CPU, peakFlops: 1e12);
            var live = CheckpointTensors.Collect(model, trainer.Optimizer);
            var single = new ShardingPlan(ParallelLayout.Even(1, 1, model.Config.NumHiddenLayers), CheckpointTensors.Catalog(live));
            var byName = live.ToDictionary();
            using var blockingStore = new FolderCheckpointStore(dir, "blocking");
            using var asyncStore = new FolderCheckpointStore(dir, "async");
            double Timed(Action a) { var sw = Stopwatch.StartNew(); a(); return sw.Elapsed.TotalSeconds; }
            for (int i = 0; i < 2; i++) trainer.TrainStep(); // gradients and moments allocated, caches warm
            // One saver per mode for all saves, as in training: the first save allocates the host copies, later ones refill them.
            var copyAtBoundary = new AsyncCheckpointSaver(asyncStore, single, 0);
            var copyBeside = new AsyncCheckpointSaver(asyncStore, single, 0);
            trainer.BeforeOptimizerUpdate = () => copyBeside.WaitForSnapshot();
            double plain = double.MaxValue, blocking = double.MaxValue, blockingStep = double.MaxValue;
            var boundary = new StallBest();
            var beside = new StallBest();
            long saveStep = 1_000;
            void Measure(AsyncCheckpointSaver saver, StallBest best, bool background, bool first)
            {
                long at = ++saveStep;
                SaveRequest request = null!;
                double wall = Timed(() =>
                {
                    request = background ? saver.BeginSave(at, byName) : saver.Save(at, byName);
                    trainer.TrainStep();
                });
                var failure = saver.WaitAsync().GetAwaiter().GetResult();
                if (!request.Started || failure is not null) throw new InvalidOperationException($"save of step {at} failed: {failure?.Message}");
                double thread = saver.LastStall.TotalSeconds;
                if (first) (best.FirstWall, best.FirstThread) = (wall, thread);
                else (best.Wall, best.Thread) = (Math.Min(best.Wall, wall), Math.Min(best.Thread, thread));
                best.Background = Math.Min(best.Background, saver.LastOutcome!.Duration.TotalSeconds);
                Directory.Delete(asyncStore.StepFolder(at), true);
            }
            for (int i = 0; i <= repeats; i++)
            {
                plain = Math.Min(plain, Math.Min(Timed(() => trainer.TrainStep()), Timed(() => trainer.TrainStep())));
                long at = ++saveStep;
                blocking = Math.Min(blocking, Timed(() => ShardedCheckpointWriter.WriteRank(blockingStore, single, 0, at, byName)));
                blockingStep = Math.Min(blockingStep, Timed(() => trainer.TrainStep()));
                Directory.Delete(blockingStore.StepFolder(at), true);
                Measure(copyAtBoundary, boundary, background: false, first: i == 0);
                Measure(copyBeside, beside, background: true, first: i == 0);
            }
            copyAtBoundary.DisposeAsync().AsTask().GetAwaiter().GetResult();
            copyBeside.DisposeAsync().AsTask().GetAwaiter().GetResult();
            trainer.BeforeOptimizerUpdate = null;
            Console.WriteLine($"training step of preset '{preset}' (seq {stepOptions.SeqLen} x batch {stepOptions.MicroBatch}, CPU, {get_num_threads()} torch threads): best plain step {plain:F3} s; " +
                              $"blocking save of the rank's state {blocking:F3} s, the step after it {blockingStep:F3} s (best of {repeats + 1}); load average {LoadAverage()}");
            Console.WriteLine();
            Console.WriteLine("| save of one rank's whole state | stall = save call + next step − plain step, s | % of blocking save | training-thread time in the saver, s | background copy + write, s |");
            Console.WriteLine("|---|---|---|---|---|");
            Console.WriteLine($"| blocking (best of {repeats + 1}) | {blocking + blockingStep - plain:F3} | {100 * (blocking + blockingStep - plain) / blocking:F0}% | {blocking:F3} | — |");
            foreach (var (name, b) in new[] { ("copy at the step boundary (Save)", boundary), ("copy beside the next forward/backward (BeginSave + WaitForSnapshot)", beside) })
            {
                Console.WriteLine($"| {name}, first save (allocates the host copies) | {b.FirstWall - plain:F3} | {100 * (b.FirstWall - plain) / blocking:F0}% | {b.FirstThread:F3} | — |");
                Console.WriteLine($"| {name}, later saves (refill them; best of {repeats}) | {b.Wall - plain:F3} | {100 * (b.Wall - plain) / blocking:F0}% | {b.Thread:F3} | {b.Background:F3} |");
            }
            Console.WriteLine();
        }
        Console.WriteLine($"load average at the end: {LoadAverage()}");
        Directory.Delete(dir, true);
    }

    /// <summary>Wall time of a save call plus the next step (first save, best later one), the training thread's time in the saver, the background's.</summary>
    sealed class StallBest
    {
        public double FirstWall, FirstThread, Wall = double.MaxValue, Thread = double.MaxValue, Background = double.MaxValue;
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

    /// <summary>SHA-256 (or XXH128) of 256 MB split over <paramref name="threads"/> threads; MB/s.</summary>
    static double HashSpeed(int threads, bool xxh128)
    {
        var data = new byte[256 << 20];
        new Random(2).NextBytes(data);
        int part = data.Length / threads;
        var sw = Stopwatch.StartNew();
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, i =>
        {
            if (xxh128) System.IO.Hashing.XxHash128.Hash(data.AsSpan(i * part, part));
            else System.Security.Cryptography.SHA256.HashData(data.AsSpan(i * part, part));
        });
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
