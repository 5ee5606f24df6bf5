// Checkpoint benchmark: sharded save/load MB/s on the folder backend beside the disk's own sequential speed, and the step stall of an async save.
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using System.Diagnostics;
using System.Runtime.InteropServices;
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
        var o = new BenchArgs("checkpoint", args);
        string preset = o.String("--preset", "small");
        string dir = o.String("--dir", Path.Combine(Path.GetTempPath(), "deepseek-ckpt-bench"));
        int diskMb = o.Int("--disk-mb", 1024, 1);
        int dp = o.Int("--dp", 4, 1), pp = o.Int("--pp", 2, 1);
        int repeats = o.Int("--repeats", 3, 1);
        // "throughput" (save and load MB/s against the disk), "cost" (a save's parts, each alone: wall and CPU time),
        // "stall" (a save's cost to the training steps); any of them.
        var parts = o.List("--parts", "throughput,stall").ToHashSet();
        string? groupNice = o.Optional("--group-nice");
        var hashes = o.List("--hashes", "xxh128,sha256,whole").ToHashSet();
        var stall = StallSettings.Read(o);
        o.Done();
        if (Directory.Exists(dir)) Directory.Delete(dir, true);
        Directory.CreateDirectory(dir);

        Console.WriteLine($"# DeepSeekCluster checkpoint benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        // Linux shares the CPU between sessions (autogroups) first and between threads within one second, so on a shared
        // machine the other sessions' load decides this process's share from second to second; a step time then measures
        // them, not the save. --group-nice (root) raises this session's weight so that the comparison of a save's threads
        // with the training's, within this process, is what the stall numbers show.
        if (groupNice is not null)
        {
            File.WriteAllText("/proc/self/autogroup", groupNice);
            Console.WriteLine($"this session's CPU group: {File.ReadAllText("/proc/self/autogroup").Trim()}");
        }
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores; folder {dir}; every read starts with its files evicted from the page cache (posix_fadvise DONTNEED)");

        // ---- The disk's physical limit: one large sequential file, fsynced, then read after evicting it ----
        string probe = Path.Combine(dir, "disk-probe.bin");
        double diskWrite = WriteSpeed(probe, diskMb), diskRead = PlainRead([probe]);
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
        if (parts.Contains("throughput")) Throughput(hashes, model, optimizer, tensors, mb, dir, probe, diskMb, dp, pp, repeats);
        if (parts.Contains("cost"))
        {
            var plan = new ShardingPlan(ParallelLayout.Even(1, 1, model.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
            CheckpointCostBench.Run(plan, tensors.ToDictionary(), dir, repeats, Console.Error.WriteLine);
        }
        if (parts.Contains("stall")) Stall(stall, model, preset, dir, repeats);
        Console.WriteLine($"load average at the end: {LoadAverage()}");
        Directory.Delete(dir, true);
    }

    /// <summary>
    /// Save and load MB/s of each layout and hash variant against the disk. A save is compared with a 1 GB fsynced
    /// write of the probe file just before it. A load is compared with plain reads of the same step's files, taken just
    /// before and just after it in the same cache state: each of the three reads starts with the files evicted from
    /// the page cache (posix_fadvise DONTNEED on each file, after an fsync, so every page is clean and goes); whatever
    /// lies beneath the guest (the disk, a VM host's cache) then serves all three alike. The plain read is the faster
    /// of one sequential stream in 64 MiB reads and the loader's own pattern (4 threads of 8 MiB preads per 32 MiB
    /// chunk) without hashing or copying: the most these files give up.
    /// </summary>
    static void Throughput(HashSet<string> hashes, DeepSeekForCausalLM model, AdamW optimizer, List<KeyValuePair<string, Tensor>> tensors, double mb,
        string dir, string probe, int diskMb, int dp, int pp, int repeats)
    {
        Console.WriteLine("| layout | save MB/s | disk write MB/s just before | save % of disk write | load MB/s, files evicted | plain read of the same files MB/s, before / after | load % of plain read | load MB/s from the page cache | save s | load s | load average |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|");
        long step = 0;
        // Chunk hashes (the folder store's default: XXH128) let one file verify on every core at memory speed; "SHA-256
        // chunks" is what the store wrote before, "whole-file hash" what a manifest without chunk hashes costs.
        // The variants take turns within each repeat, so a change in the machine's load hits them alike.
        var variants = new (int D, int P, ChunkHashAlgorithm? Chunks)[]
        {
            (1, 1, ChunkHashAlgorithm.Xxh128), (1, 1, ChunkHashAlgorithm.Sha256), (1, 1, null),
            (dp, pp, ChunkHashAlgorithm.Xxh128), (dp, pp, ChunkHashAlgorithm.Sha256), (dp, pp, null),
        }.Where(v => hashes.Contains(v.Chunks switch { ChunkHashAlgorithm.Xxh128 => "xxh128", ChunkHashAlgorithm.Sha256 => "sha256", _ => "whole" })).ToArray();
        var results = variants.Select(_ => new List<ThroughputRun>()).ToArray();
        for (int i = 0; i < repeats; i++)
            for (int v = 0; v < variants.Length; v++)
            {
                var (d, p, chunks) = variants[v];
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
                var files = Directory.GetFiles(store.StepFolder(step), "*.safetensors");
                double before = PlainRead(files);
                Evict(files);
                sw.Restart();
                ShardedCheckpointLoader.LoadReplicaAsync(store, step, model, optimizer).GetAwaiter().GetResult();
                double load = sw.Elapsed.TotalSeconds;
                double after = PlainRead(files);
                sw.Restart(); // the same files again, now in the page cache: what the loader costs beyond the disk
                ShardedCheckpointLoader.LoadReplicaAsync(store, step, model, optimizer).GetAwaiter().GetResult();
                double warm = sw.Elapsed.TotalSeconds;
                Console.Error.WriteLine($"  {DateTime.UtcNow:HH:mm:ss} dp {d} x pp {p} {chunks}: save {mb / save:F0} MB/s (disk {written:F0}), load {mb / load:F0} MB/s (plain read {before:F0} / {after:F0}), warm {mb / warm:F0}; load {LoadAverage()}");
                results[v].Add(new ThroughputRun(mb / save, written, mb / load, before, after, mb / warm, save, load, LoadAverage()));
                Directory.Delete(store.StepFolder(step), true);
            }
        for (int v = 0; v < variants.Length; v++)
        {
            var (d, p, chunks) = variants[v];
            string hash = chunks switch { ChunkHashAlgorithm.Xxh128 => "32 MiB chunk XXH128", ChunkHashAlgorithm.Sha256 => "32 MiB chunk SHA-256 (before)", _ => "whole-file SHA-256 only" };
            foreach (var r in results[v])
                Console.WriteLine($"| dp {d} x pp {p} ({d * p} files, {hash}) | {r.Save:F0} | {r.Write:F0} | {100 * r.Save / r.Write:F0}% | {r.Load:F0} | {r.ReadBefore:F0} / {r.ReadAfter:F0} | " +
                                  $"{100 * r.Load / ((r.ReadBefore + r.ReadAfter) / 2):F0}% | {r.Warm:F0} | {r.SaveS:F2} | {r.LoadS:F2} | {r.LoadAverage} |");
        }
        Console.WriteLine();
        Console.WriteLine("| layout | median save % of disk write | median load % of plain read | median load MB/s | median plain read MB/s |");
        Console.WriteLine("|---|---|---|---|---|");
        for (int v = 0; v < variants.Length; v++)
        {
            var (d, p, chunks) = variants[v];
            var rs = results[v];
            Console.WriteLine($"| dp {d} x pp {p}, {chunks?.ToString() ?? "whole-file"} | {100 * Median(rs.Select(r => r.Save / r.Write)):F0}% | " +
                              $"{100 * Median(rs.Select(r => r.Load / ((r.ReadBefore + r.ReadAfter) / 2))):F0}% | {Median(rs.Select(r => r.Load)):F0} | {Median(rs.Select(r => (r.ReadBefore + r.ReadAfter) / 2)):F0} |");
        }
        Console.WriteLine($"load average after the saves and loads: {LoadAverage()}");
        Console.WriteLine();
    }

    sealed record ThroughputRun(double Save, double Write, double Load, double ReadBefore, double ReadAfter, double Warm, double SaveS, double LoadS, string LoadAverage);

    static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        if (sorted.Length == 0) return double.NaN;
        return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
    }

    /// <summary>
    /// Step stall of async saves (one rank, dp 1 x pp 1) against a blocking save, with real training steps of the same
    /// model (the Trainer with its own AdamW, one small micro-batch) so the background copy really overlaps a forward and
    /// backward pass. A save's background work outlasts the step after it (on this CPU-only machine it shares the cores
    /// with the step), so its stall is what it costs every step until it is done: the wall time from the save call to
    /// the end of the first step after which the save is finished, minus that many plain steps (the median of the plain
    /// steps around it). The modes take turns within each repeat: a blocking save; for each background nice value, a new
    /// saver's first save (it allocates the host copies) and its second (refills them); and a saver that prepared its
    /// copies (Prepare, during plain steps whose extra time is reported as its cost) before its first save.
    /// </summary>
    /// <summary>The stall part's options (read with the others, before the bench starts).</summary>
    sealed record StallSettings(int[] Nices, int[] Yields, bool WithPrepare, int? TorchThreads, int PrepareNice, bool Cuda)
    {
        public static StallSettings Read(BenchArgs o)
        {
            var nices = o.Ints("--nice", "0,10");
            // Torch threads the trainer gives up while a save runs (AsyncCheckpointSaver.YieldTorchThreads), compared in turns.
            var yields = o.Ints("--yield", "0");
            bool withPrepare = o.Bool("--prepare", true);
            // One torch thread on a machine of more cores leaves the save a core the step does not use, as a GPU box does
            // (its step is one host thread launching kernels); with every core in the step the save can only take from it.
            int? threads = o.OptionalInt("--torch-threads", 1);
            int prepareNice = o.Int("--prepare-nice", nices.Contains(10) ? 10 : nices[^1]);
            // cuda (the GPU bundle, bench/gpu/run.sh): the host copies are pinned and filled by device-to-host copies.
            bool cuda = o.Choice("--device", "cpu", "cpu", "cuda") == "cuda";
            return new(nices, yields, withPrepare, threads, prepareNice, cuda);
        }
    }

    static void Stall(StallSettings settings, DeepSeekForCausalLM model, string preset, string dir, int repeats)
    {
        var (nices, yields, withPrepare, prepareNice) = (settings.Nices, settings.Yields, settings.WithPrepare, settings.PrepareNice);
        if (settings.TorchThreads is { } threads) set_num_threads(threads);
        var device = settings.Cuda ? CUDA : CPU;
        if (device.type == TorchSharp.DeviceType.CUDA) model.to(device);
        var stepOptions = new TrainingOptions { SeqLen = 64, GlobalBatch = 2, MicroBatch = 2, Steps = 100_000, WarmupSteps = 1 };
        var rng = new Random(1);
        var tokens = new int[(stepOptions.SeqLen + 1) * 256];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(model.Config.VocabSize);
        using var trainer = new Trainer(model, new Training.Data.TokenDataset(tokens, stepOptions.SeqLen), null, stepOptions, device, peakFlops: 1e12);
        var live = CheckpointTensors.Collect(model, trainer.Optimizer);
        var single = new ShardingPlan(ParallelLayout.Even(1, 1, model.Config.NumHiddenLayers), CheckpointTensors.Catalog(live));
        var byName = live.ToDictionary();
        using var blockingStore = new FolderCheckpointStore(dir, "blocking");
        using var asyncStore = new FolderCheckpointStore(dir, "async");
        for (int i = 0; i < 2; i++) trainer.TrainStep(); // gradients and moments allocated, caches warm
        AsyncCheckpointSaver? current = null;
        trainer.BeforeStateChange = _ => current?.WaitForSnapshot();
        long saveStep = 1_000;
        double Timed(Action a) { var sw = Stopwatch.StartNew(); a(); return sw.Elapsed.TotalSeconds; }
        var plainSteps = new List<double>();
        int plainGcs = 0;
        var plainPause = TimeSpan.Zero;
        double Plain(int n)
        {
            int gcs = GC.CollectionCount(0);
            var pause = GC.GetTotalPauseDuration();
            var these = Enumerable.Range(0, n).Select(_ => Timed(() => trainer.TrainStep())).ToList();
            plainGcs += GC.CollectionCount(0) - gcs;
            plainPause += GC.GetTotalPauseDuration() - pause;
            plainSteps.AddRange(these);
            return Median(these);
        }
        // Begins a save, then trains until it is done; returns (stall against the plain step, steps it spanned, training-thread time in the saver, background time).
        (double Stall, int Steps, double Thread, double Background) Spanned(AsyncCheckpointSaver saver, double plain)
        {
            long at = ++saveStep;
            var pause = GC.GetTotalPauseDuration();
            var sw = Stopwatch.StartNew();
            var request = saver.BeginSave(at, byName);
            if (!request.Started) throw new InvalidOperationException($"the save of step {at} did not start");
            int steps = 0;
            do { trainer.TrainStep(); steps++; } while (saver.Busy && steps < 100);
            double wall = sw.Elapsed.TotalSeconds;
            saver.RestoreThreads(); // the plain steps after it run with every thread again
            double paused = (GC.GetTotalPauseDuration() - pause).TotalSeconds;
            Console.Error.WriteLine($"    GC pauses during the save's {steps} steps: {paused:F3} s ({paused / steps:F3} s per step)");
            var failure = saver.WaitAsync().GetAwaiter().GetResult();
            if (failure is not null) throw new InvalidOperationException($"the save of step {at} failed: {failure.Message}");
            Directory.Delete(asyncStore.StepFolder(at), true);
            return (wall - steps * plain, steps, saver.LastStall.TotalSeconds, saver.LastOutcome!.Duration.TotalSeconds);
        }

        var blocking = new List<(double Save, double Stall, string Load)>();
        var fewerThreads = new List<(double Full, double Fewer)>();
        var rows = new Dictionary<string, List<(double Stall, int Steps, double Thread, double Background, double Blocking, string Load)>>();
        void Add(string name, (double Stall, int Steps, double Thread, double Background) r, double reference)
        {
            if (!rows.TryGetValue(name, out var list)) rows[name] = list = [];
            list.Add((r.Stall, r.Steps, r.Thread, r.Background, reference, LoadAverage()));
            Console.Error.WriteLine($"  {DateTime.UtcNow:HH:mm:ss} {name}: stall {r.Stall:F2} s over {r.Steps} steps ({100 * r.Stall / reference:F0}% of {reference:F2} s), load {LoadAverage()}");
        }
        for (int i = 0; i < repeats; i++)
        {
            double plain = Plain(3);
            long at = ++saveStep;
            double save = Timed(() => ShardedCheckpointWriter.WriteRank(blockingStore, single, 0, at, byName));
            double next = Timed(() => trainer.TrainStep());
            Directory.Delete(blockingStore.StepFolder(at), true);
            blocking.Add((save, save + next - plain, LoadAverage()));
            Console.Error.WriteLine($"  {DateTime.UtcNow:HH:mm:ss} blocking save {save:F2} s, the step after it {next:F2} s, plain {plain:F2} s; load {LoadAverage()}");
            if (yields.Any(y => y > 0) && get_num_threads() > 1)
            {
                // What a step costs with one torch thread fewer and no save: on a loaded machine fewer threads can be faster.
                int all = get_num_threads();
                set_num_threads(all - 1);
                double fewer = Median(Enumerable.Range(0, 2).Select(_ => Timed(() => trainer.TrainStep())));
                set_num_threads(all);
                double full = Plain(2);
                fewerThreads.Add((full, fewer));
                Console.Error.WriteLine($"  {DateTime.UtcNow:HH:mm:ss} plain step with {all} torch threads {full:F2} s, with {all - 1} {fewer:F2} s; load {LoadAverage()}");
            }
            foreach (int nice in nices)
                foreach (int yielded in yields)
                {
                    string name = yielded > 0 ? $"nice {nice}, trainer yields {yielded} torch thread(s) while it runs" : $"nice {nice}";
                    plain = Plain(2);
                    var saver = current = new AsyncCheckpointSaver(asyncStore, single, 0) { BackgroundNice = nice, YieldTorchThreads = yielded };
                    Add($"{name}, first save of a saver (allocates the host copies)", Spanned(saver, plain), save);
                    plain = Plain(2);
                    Add($"{name}, second save (refills them)", Spanned(saver, plain), save);
                    saver.DisposeAsync().AsTask().GetAwaiter().GetResult();
                }
            if (withPrepare)
            {
                plain = Plain(2);
                var saver = current = new AsyncCheckpointSaver(asyncStore, single, 0) { BackgroundNice = prepareNice };
                var sw = Stopwatch.StartNew();
                var preparing = saver.Prepare(byName);
                int steps = 0;
                do { trainer.TrainStep(); steps++; } while (!preparing.IsCompleted && steps < 100);
                Add($"nice {prepareNice}, Prepare during plain steps (its cost to them)", (sw.Elapsed.TotalSeconds - steps * plain, steps, 0, 0), save);
                plain = Plain(2);
                Add($"nice {prepareNice}, first save after Prepare", Spanned(saver, plain), save);
                saver.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
            current = null;
        }
        trainer.BeforeStateChange = null;
        Console.WriteLine($"training step of preset '{preset}' (seq {stepOptions.SeqLen} x batch {stepOptions.MicroBatch}, {device.type}, {get_num_threads()} torch threads): " +
                          $"plain step median {Median(plainSteps):F3} s (min {plainSteps.Min():F3}, max {plainSteps.Max():F3}, {plainSteps.Count} steps, {(double)plainGcs / plainSteps.Count:F1} gen-0 GCs and {plainPause.TotalSeconds / plainSteps.Count:F3} s of GC pauses per step); load average {LoadAverage()}");
        if (fewerThreads.Count > 0)
            Console.WriteLine($"plain steps without a save, per repeat: {string.Join(" / ", fewerThreads.Select(f => $"{f.Full:F2} s with every torch thread, {f.Fewer:F2} s with one fewer"))}");
        Console.WriteLine();
        Console.WriteLine("| save of one rank's whole state | stall s, per repeat | steps the save spanned | % of that repeat's blocking save, per repeat | median % | training-thread time in the saver s | background copy + write s | load average per repeat |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|");
        string Join(IEnumerable<double> xs, string format) => string.Join(" / ", xs.Select(x => x.ToString(format, System.Globalization.CultureInfo.InvariantCulture)));
        Console.WriteLine($"| blocking save: the save itself (the reference) | {Join(blocking.Select(b => b.Save), "F2")} | — | 100% | 100% | {Join(blocking.Select(b => b.Save), "F2")} | — | {string.Join(" / ", blocking.Select(b => b.Load))} |");
        Console.WriteLine($"| blocking save + the step after it − plain step | {Join(blocking.Select(b => b.Stall), "F2")} | 1 | {Join(blocking.Select(b => 100 * b.Stall / b.Save), "F0")}% | {100 * Median(blocking.Select(b => b.Stall / b.Save)):F0}% | — | — | |");
        foreach (var (name, list) in rows)
            Console.WriteLine($"| {name} | {Join(list.Select(r => r.Stall), "F2")} | {string.Join(" / ", list.Select(r => r.Steps))} | {Join(list.Select(r => 100 * r.Stall / r.Blocking), "F0")}% | " +
                              $"{100 * Median(list.Select(r => r.Stall / r.Blocking)):F0}% | {Join(list.Select(r => r.Thread), "F3")} | {Join(list.Select(r => r.Background), "F2")} | {string.Join(" / ", list.Select(r => r.Load))} |");
        Console.WriteLine();
    }

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

    /// <summary>
    /// The fastest plain read of <paramref name="files"/> from outside the page cache, MB/s: one sequential stream in
    /// 64 MiB reads, and the loader's pattern (its 32 MiB chunks over 4 threads, 8 MiB preads), each after evicting them.
    /// </summary>
    static double PlainRead(string[] files)
    {
        long total = files.Sum(f => new FileInfo(f).Length);
        Evict(files);
        var sw = Stopwatch.StartNew();
        var block = new byte[64 << 20];
        foreach (var f in files)
        {
            using var fs = new FileStream(f, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0);
            while (fs.Read(block, 0, block.Length) > 0) { }
        }
        double sequential = total / 1e6 / sw.Elapsed.TotalSeconds;

        Evict(files);
        const long chunk = 32L << 20;
        var work = files.SelectMany(f => Enumerable.Range(0, (int)((new FileInfo(f).Length + chunk - 1) / chunk)).Select(k => (File: f, Start: k * chunk))).ToArray();
        var handles = files.ToDictionary(f => f, f => File.OpenHandle(f, FileMode.Open, FileAccess.Read, FileShare.Read));
        int next = -1;
        sw.Restart();
        var threads = Enumerable.Range(0, 4).Select(_ => new Thread(() =>
        {
            var buffer = new byte[8 << 20];
            for (int k; (k = Interlocked.Increment(ref next)) < work.Length;)
            {
                var (f, start) = work[k];
                long end = Math.Min(start + chunk, RandomAccess.GetLength(handles[f]));
                for (long at = start; at < end;)
                {
                    int n = RandomAccess.Read(handles[f], buffer.AsSpan(0, (int)Math.Min(buffer.Length, end - at)), at);
                    if (n == 0) break;
                    at += n;
                }
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        double parallel = total / 1e6 / sw.Elapsed.TotalSeconds;
        foreach (var h in handles.Values) h.Dispose();
        Evict(files);
        return Math.Max(sequential, parallel);
    }

    [DllImport("libc", SetLastError = true)]
    static extern int posix_fadvise(int fd, long offset, long length, int advice);

    /// <summary>
    /// Drops the files' pages from the page cache: written back first (fsync), so all are clean and DONTNEED frees
    /// them. Only these files: the machine's other work keeps its cache.
    /// </summary>
    static void Evict(string[] files)
    {
        foreach (var f in files)
        {
            using var fs = new FileStream(f, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite, bufferSize: 0);
            fs.Flush(flushToDisk: true);
            if (posix_fadvise((int)fs.SafeFileHandle.DangerousGetHandle(), 0, 0, 4 /* POSIX_FADV_DONTNEED */) != 0)
                throw new IOException($"posix_fadvise(DONTNEED) on {f} failed: errno {Marshal.GetLastPInvokeError()}");
        }
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
}
