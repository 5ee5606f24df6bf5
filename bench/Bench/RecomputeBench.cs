// Activation recompute: what each mode keeps after the forward, its peak in the step and the time it adds, side by side
// in one process (interleaved rounds, so the machine's load falls on every mode alike), beside the memory planner's estimate.
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static partial class RecomputeBench
{
    static readonly string[] Modes = ["none", "full", "selective"];

    public static void Run(string[] args)
    {
        var o = new BenchArgs("recompute", args);
        var preset = o.String("--preset", "small");
        int seqLen = o.Int("--seq-len", 256, 1), batch = o.Int("--batch", 4, 1);
        int rounds = o.Int("--rounds", 5, 1);
        // On a shared machine more torch threads than free cores spin against each other: one thread gave steady rounds.
        int torchThreads = o.Int("--torch-threads", 1, 1);
        var precision = o.Choice("--precision", "fp32", "fp32", "bf16");
        o.Done();
        set_num_threads(torchThreads);
        // Every allocation of 64 KiB and up is its own mapping, returned on free: resident bytes follow live tensors
        // (glibc's default threshold grows after frees, and freed heap memory would stay resident and hide the saving).
        if (mallopt(MmapThreshold, 64 << 10) != 1) throw new InvalidOperationException("mallopt(M_MMAP_THRESHOLD) failed: resident bytes would not follow live tensors");

        var config = DeepSeekConfig.Preset(preset);
        manual_seed(1);
        using var model = new DeepSeekForCausalLM(config).InitializeWeights();
        if (precision == "bf16") model.to(ScalarType.BFloat16);
        model.train();
        var ids = randint(0, config.VocabSize, [batch, seqLen + 2], dtype: ScalarType.Int64);
        Console.WriteLine($"# Activation recompute — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}, " +
                          $"load {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
        Console.WriteLine($"{preset} ({config.NumHiddenLayers} layers + {config.NumNextnPredictLayers} MTP), {precision}, {batch} x {seqLen} tokens, LM + MTP + balance loss; " +
                          $"medians of {rounds} rounds after one warm-up round");
        Console.WriteLine();

        var results = Modes.ToDictionary(m => m, _ => new List<Pass>());
        for (int round = -1; round < rounds; round++)
            foreach (var mode in Modes)
            {
                // The peak's sampler spins on a core of its own and would count in the CPU seconds: a second pass reads it.
                var pass = Step(model, ActivationRecompute.Parse(mode), ids, seqLen, samplePeak: false) with
                {
                    MallocPeak = Step(model, ActivationRecompute.Parse(mode), ids, seqLen, samplePeak: true).MallocPeak,
                };
                Console.Error.WriteLine($"round {round + 1}, {mode}: kept {Mib(pass.Kept):F1} MiB, peak {Mib(pass.Peak):F1} MiB, malloc's peak {Mib(pass.MallocPeak):F1} MiB, fwd {pass.Forward:F3} s, bwd {pass.Backward:F3} s, CPU {pass.Cpu:F2} s");
                if (round >= 0) results[mode].Add(pass);
            }

        var layout = new ParallelLayout(1, 1, [new StageLayers(0, config.NumHiddenLayers)]);
        var none = Median(results["none"], p => p.Kept);
        double noneTime = Median(results["none"], p => p.Forward + p.Backward), noneCpu = Median(results["none"], p => p.Cpu);
        Console.WriteLine("| mode | kept after forward MiB | malloc's bytes kept MiB | saved vs none | planner's activations MiB | malloc's peak in step MiB (rounds' range) | resident peak in step over start MiB | fwd s | bwd s | wall fwd + bwd vs none | CPU s | CPU vs none |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var mode in Modes)
        {
            var r = results[mode];
            double heap = Median(r, p => p.Malloc), heapPeak = Median(r, p => p.MallocPeak), kept = Median(r, p => p.Kept), peak = Median(r, p => p.Peak), fwd = Median(r, p => p.Forward), bwd = Median(r, p => p.Backward), cpu = Median(r, p => p.Cpu);
            double wall = Median(r, p => p.Forward + p.Backward);
            long predicted = MemoryPlanner.Predict(config, layout, 0, new MemoryInputs(precision, mode, batch, seqLen)).Activations;
            Console.WriteLine($"| {mode} | {Mib(kept):F1} | {Mib(heap):F1} | {(mode == "none" ? "—" : $"{1 - kept / none:P0}")} | {Mib(predicted):F1} | {Mib(heapPeak):F1} ({Mib(r.Min(p => p.MallocPeak)):F1}–{Mib(r.Max(p => p.MallocPeak)):F1}) | {Mib(peak):F1} | {fwd:F3} | {bwd:F3} | " +
                              $"{wall / noneTime:F2}× | {cpu:F2} | {cpu / noneCpu:F2}× |");
        }
        ActivationRecompute.Apply(model, RecomputeMode.None);
    }

    /// <summary>
    /// Bytes and wall seconds of one pass, and the process's CPU seconds (steadier than wall time on a loaded machine).
    /// MallocPeak: the most of malloc's bytes in use over the start that a second thread saw, reading them without pause
    /// through forward and backward (a read can miss a short peak, and can count another thread's allocation: the table
    /// shows the median and the rounds' range).
    /// </summary>
    sealed record Pass(double Kept, double Peak, double Forward, double Backward, double Cpu, double Malloc, double MallocPeak);

    /// <summary>
    /// One forward and backward; gradients stay allocated between passes so every pass starts from the same bytes. With
    /// <paramref name="samplePeak"/>, a second thread reads malloc's bytes in use throughout (its times are not the step's).
    /// </summary>
    static Pass Step(DeepSeekForCausalLM model, RecomputeMode mode, Tensor ids, int seqLen, bool samplePeak)
    {
        ActivationRecompute.Apply(model, mode);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long start = Resident(), heapStart = HeapInUse();
        File.WriteAllText("/proc/self/clear_refs", "5"); // resets the peak resident size (VmHWM) to the current one
        using var scope = NewDisposeScope();
        long heapPeak = heapStart;
        bool stop = false;
        var sampler = new Thread(() => { while (!Volatile.Read(ref stop)) heapPeak = Math.Max(heapPeak, HeapInUse()); }) { IsBackground = true };
        if (samplePeak) sampler.Start();
        var cpu = Process.GetCurrentProcess().TotalProcessorTime;
        var sw = Stopwatch.StartNew();
        var output = model.Forward(ids.narrow(1, 0, seqLen), withMtp: true);
        var loss = Evaluation.CrossEntropy(output.Logits_BTV, ids.narrow(1, 1, seqLen));
        for (int k = 1; k <= output.MtpLogits.Count; k++)
            loss = loss + Evaluation.CrossEntropy(output.MtpLogits[k - 1], ids.narrow(1, k + 1, output.MtpLogits[k - 1].shape[1])) * 0.3;
        if (output.AuxLoss is { } aux) loss = loss + aux;
        double forward = sw.Elapsed.TotalSeconds;
        long kept = Resident() - start, heapKept = HeapInUse() - heapStart;
        sw.Restart();
        loss.backward();
        double backward = sw.Elapsed.TotalSeconds;
        double cpuSeconds = (Process.GetCurrentProcess().TotalProcessorTime - cpu).TotalSeconds;
        Volatile.Write(ref stop, true);
        if (samplePeak) sampler.Join();
        long peak = PeakResident() - start;
        using (no_grad()) foreach (var p in model.parameters()) p.grad?.zero_();
        return new Pass(kept, peak, forward, backward, cpuSeconds, heapKept, heapPeak - heapStart);
    }

    /// <summary>malloc's chunks in use and mapped blocks (mallinfo2), what the tests' MallocHeap reads: libtorch's CPU tensors, byte for byte.</summary>
    static long HeapInUse()
    {
        var m = mallinfo2();
        return (long)m.Uordblks + (long)m.Hblkhd;
    }

    [StructLayout(LayoutKind.Sequential)]
    struct MallInfo2 { public nuint Arena, Ordblks, Smblks, Hblks, Hblkhd, Usmblks, Fsmblks, Uordblks, Fordblks, Keepcost; }

    [DllImport("libc")]
    static extern MallInfo2 mallinfo2();

    static long Resident() => long.Parse(File.ReadAllText("/proc/self/statm").Split(' ')[1]) * Environment.SystemPageSize;

    static long PeakResident() => long.Parse(HighWater().Match(File.ReadAllText("/proc/self/status")).Groups[1].Value) * 1024;

    [GeneratedRegex(@"VmHWM:\s+(\d+) kB")]
    private static partial Regex HighWater();

    const int MmapThreshold = -3; // M_MMAP_THRESHOLD in glibc's malloc.h

    [DllImport("libc", EntryPoint = "mallopt")]
    static extern int mallopt(int param, int value);

    static double Mib(double bytes) => bytes / (1 << 20);

    static double Median(List<Pass> passes, Func<Pass, double> value)
    {
        var sorted = passes.Select(value).Order().ToList();
        return sorted[sorted.Count / 2];
    }
}
