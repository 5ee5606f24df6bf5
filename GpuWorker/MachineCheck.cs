// gpu-worker check: what this machine offers a worker (runtime, libtorch, CUDA, collectives, NCCL), in the spirit of
// DeepSpeed's ds_report and PyTorch's collect_env, with a real NCCL all-reduce over the local GPUs where there are some.
using System.Diagnostics;
using System.Runtime.InteropServices;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Perf;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker;

public static class MachineCheck
{
    public const string Usage = """
          gpu-worker check [--device auto|cpu|cuda]
              Reports what this machine offers a worker: .NET, libtorch and its build, the CUDA driver and devices,
              the collective backend the device gets, and NCCL (which libnccl.so.2 loads, its version, the entry
              points the nccl backend calls, a unique id, and a communicator of one rank or NCCL's reason why not).
              With CUDA devices it runs an NCCL all-reduce across them, blocking and on the overlap's side stream,
              and copies from the GPU into pinned host memory as the async checkpoint does. Shows the fp32 peak MFU is measured against
              (on a CPU it calibrates and caches it when no calibration exists: run it while the machine is idle).
              Exit code 0 when the device can train in a cluster, 1 when it cannot (the reason is printed).
        """;

    public static int Run(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string>());
        var asked = cl.String("device") ?? "auto";
        cl.RejectUnknown();
        var device = StandaloneRun.ResolveDevice(asked);
        var output = Console.Out;
        output.WriteLine("gpu-worker check");

        Line(output, "runtime", $"{RuntimeInformation.FrameworkDescription} on {RuntimeInformation.RuntimeIdentifier}, {Environment.ProcessorCount} processors");
        // Asking for CUDA makes TorchSharp load libtorch_cuda.so where it finds one (beside the binaries, or on
        // LD_LIBRARY_PATH); which files the loader then holds is what the build really is.
        int gpus = cuda.is_available() ? cuda.device_count() : 0;
        var loaded = SharedLibrary.LoadedFiles();
        var torchCpu = loaded.GetValueOrDefault("libtorch_cpu.so");
        var torchCuda = loaded.GetValueOrDefault("libtorch_cuda.so");
        Line(output, "libtorch", $"TorchSharp {typeof(torch).Assembly.GetName().Version?.ToString(3)} on {torchCpu ?? "libtorch_cpu.so"}");
        Line(output, "", torchCuda is not null ? $"CUDA build: {torchCuda}" : "CPU build (TorchSharp-cpu; build with -p:TorchBackend=cuda, or put a CUDA libtorch on LD_LIBRARY_PATH, for GPUs)");
        Line(output, "CUDA driver", NativeLibrary.TryLoad("libcuda.so.1", out var driver) ? $"libcuda.so.1 at {SharedLibrary.PathOf(driver, "cuInit") ?? "an unknown path"}" : "libcuda.so.1 not found (no NVIDIA driver)");
        Line(output, "CUDA", gpus > 0 ? $"{gpus} device(s) visible to libtorch" : "not available to libtorch");
        if (device.type == DeviceType.CUDA)
            // What the driver says of the worker's GPU: its memory is a cluster rank's budget (WorkerSettings.MemoryBudget)
            // unless Worker:MemoryBudgetBytes is set, and its name picks the declared MFU peak below.
            Line(output, "GPU", $"{CudaDevice.Name(device) ?? "(the driver gave no name)"}, " +
                 (CudaDevice.TotalMemory(device) is { } bytes ? $"{bytes / (double)(1L << 30):0.0} GiB" : "memory unknown to the driver") +
                 $", {CudaDevice.Identity(device)}");
        var backend = Collective.BackendFor(device);
        Line(output, "device", $"{device} (asked: {asked})");
        Line(output, "collectives", backend == "nccl" ? "nccl (CUDA tensors)" : "tcp (ring all-reduce over sockets, CPU tensors)");
        // The fp32 peak a cluster worker's MFU will be against (on a CPU this makes the cached calibration: run it idle).
        Line(output, "MFU peak", HardwarePeak.For(device, ScalarType.Float32, PeakSettings.FromEnvironment()).ToString());

        var nccl = NcclCollective.Inspect();
        if (!nccl.Loaded)
            Line(output, "NCCL", $"not loaded: {nccl.Problem}");
        else
        {
            Line(output, "NCCL", $"{nccl.Version} from {nccl.Path ?? "libnccl.so.2"}; {nccl.Required - nccl.Missing.Count} of {nccl.Required} entry points the nccl backend calls");
            if (nccl.Problem is not null) Line(output, "", $"unusable: {nccl.Problem}");
            else
            {
                try
                {
                    Line(output, "unique id", $"created ({NcclCollective.CreateUniqueId().Length} bytes): the bootstrap works");
                    Line(output, "communicator", NcclCollective.TryCommunicatorOfOne() is { } why
                        ? $"NCCL cannot form one here: {why}" : "NCCL formed one of 1 rank on the current CUDA device");
                }
                catch (CollectiveException e) { Line(output, "", $"failed: {e.Message}"); nccl = nccl with { Problem = e.Message }; }
            }
        }

        string? problem = null;
        if (backend == "nccl")
        {
            if (nccl.Problem is not null) problem = $"the {device} device needs the nccl backend: {nccl.Problem}";
            else
            {
                try
                {
                    var (blocking, sideStream) = AllReduceAcross(gpus);
                    Line(output, "all-reduce", blocking);
                    Line(output, "side stream", sideStream);
                }
                catch (Exception e) when (e is CollectiveException or InvalidOperationException) { problem = $"NCCL all-reduce across {gpus} device(s) failed: {e.Message}"; }
            }
        }
        else Line(output, "all-reduce", "not run: the NCCL all-reduce needs CUDA devices");
        if (device.type == DeviceType.CUDA)
        {
            try { Line(output, "pinned copy", PinnedHostCopy(device)); }
            catch (InvalidOperationException e) { problem ??= e.Message; }
        }

        output.WriteLine(problem is null ? $"ok: this machine can train on {device} with the {backend} backend" : $"not ready: {problem}");
        return problem is null ? 0 : 1;
    }

    /// <summary>
    /// One rank per local GPU, each on its own thread as separate processes would be: rank r all-reduces a vector of
    /// (r + 1), and every rank must then hold 1 + 2 + ... + n exactly (small integers are exact in float32). Then the
    /// overlapped data-parallel all-reduce's launch (<see cref="NcclCollective.AllReduceAfterCompute"/>, the only code of
    /// that path a CPU test cannot run): the vector is rewritten as (r + 1) + 4096 by kernels queued on the default stream
    /// behind a 4096² matmul, all-reduced on the side stream after an event, and waited for by event
    /// (<see cref="NcclCollective.WaitForSideStream"/>); an all-reduce that did not wait for those kernels reads the old values.
    /// </summary>
    static (string Blocking, string SideStream) AllReduceAcross(int gpus)
    {
        var id = NcclCollective.CreateUniqueId();
        const int elements = 1 << 22;
        var clock = Stopwatch.StartNew();
        TimeSpan? blocking = null; // the first rank's blocking all-reduce done
        var ranks = Enumerable.Range(0, gpus).Select(rank => Task.Factory.StartNew(() =>
        {
            var device = new Device(DeviceType.CUDA, rank);
            using var collective = NcclCollective.Create(id, rank, gpus, generation: 0, device, TimeSpan.FromSeconds(60));
            using var values = full(elements, rank + 1, dtype: ScalarType.Float32, device: device);
            collective.AllReduce(values);
            float expected = gpus * (gpus + 1) / 2f, min = values.min().cpu().item<float>(), max = values.max().cpu().item<float>();
            if (min != expected || max != expected)
                throw new InvalidOperationException($"rank {rank} holds values in [{min}, {max}] after the all-reduce; expected {expected} everywhere");
            lock (clock) blocking ??= clock.Elapsed;

            using var square = ones(4096, 4096, dtype: ScalarType.Float32, device: device);
            using var product = square.mm(square); // every element 4096, exact in float32
            using var largest = product.max();
            values.fill_(rank + 1).add_(largest);
            collective.AllReduceAfterCompute(values);
            collective.WaitForSideStream();
            expected += gpus * 4096f;
            (min, max) = (values.min().cpu().item<float>(), values.max().cpu().item<float>());
            if (min != expected || max != expected)
                throw new InvalidOperationException($"rank {rank} holds values in [{min}, {max}] after the side stream's all-reduce; expected {expected} everywhere " +
                                                    "(it did not wait for the default stream's kernels, or its wait returned early)");
            EveryOperation(collective, device);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        try { Task.WaitAll(ranks); }
        catch (AggregateException e) { throw e.InnerExceptions.First(); }
        return ($"{gpus} rank(s), {elements} float32 each: every rank holds the exact sum ({blocking?.TotalMilliseconds:0} ms with communicator setup)",
                $"all-reduce after a matmul on the default stream, waited for by event: every rank holds the exact sum; then every other " +
                $"operation the nccl backend binds (sum/avg/max in float32, bfloat16, int64; reduce-scatter, all-gather, all-to-all, broadcast" +
                $"{(gpus > 1 ? ", send/recv" : "")}) gave the exact result ({(clock.Elapsed - blocking)?.TotalMilliseconds:0} ms)");
    }

    /// <summary>
    /// Every operation of the nccl backend once, with values whose results are exact (small integers), checked on every
    /// rank: the binding's pointers, counts, dtypes and reduce ops as ZeRO (reduce-scatter, all-gather), expert
    /// parallelism (all-to-all with per-peer rows), a replica's live state (broadcast) and the exact sum (int64) use them.
    /// Any backend: the tests run it over tcp (MachineCheckTests), which proves its expected values before a GPU runs it.
    /// </summary>
    internal static void EveryOperation(ICollective c, Device device)
    {
        int n = c.WorldSize, r = c.Rank;
        void Expect(Tensor actual, Tensor expected, string what)
        {
            using var host = actual.cpu().to_type(ScalarType.Float64);
            using var want = expected.to_type(ScalarType.Float64);
            using var same = host.eq(want).all();
            if (!same.item<bool>())
                throw new InvalidOperationException($"rank {r}: {what} gave [{string.Join(", ", host.data<double>().Take(8))}...]; expected [{string.Join(", ", want.data<double>().Take(8))}...]");
        }
        foreach (var (op, dtype, want) in new[]
        {
            (ReduceOp.Sum, ScalarType.Float32, n * (n + 1) / 2.0), (ReduceOp.Sum, ScalarType.BFloat16, n * (n + 1) / 2.0),
            (ReduceOp.Sum, ScalarType.Int64, n * (n + 1) / 2.0), (ReduceOp.Avg, ScalarType.Float32, (n + 1) / 2.0),
            (ReduceOp.Max, ScalarType.Float32, n),
        })
        {
            using var x = full(1000, r + 1, dtype: dtype, device: device);
            c.AllReduce(x, op);
            using var expected = full(1000, want, dtype: ScalarType.Float64);
            Expect(x, expected, $"all-reduce {op} of {dtype}");
        }
        const long k = 1000;
        using (var input = full(n * k, r + 1, dtype: ScalarType.Float32, device: device))
        using (var output = empty(k, dtype: ScalarType.Float32, device: device))
        using (var expected = full(k, n * (n + 1) / 2.0, dtype: ScalarType.Float64))
        {
            c.ReduceScatter(input, output);
            Expect(output, expected, "reduce-scatter");
        }
        using (var input = full(k, r + 1, dtype: ScalarType.BFloat16, device: device))
        using (var output = empty(n * k, dtype: ScalarType.BFloat16, device: device))
        using (var expected = arange(1, n + 1, dtype: ScalarType.Float64).repeat_interleave(k))
        {
            c.AllGather(input, output);
            Expect(output, expected, "all-gather");
        }
        using (var x = full(k, r + 1, dtype: ScalarType.Float32, device: device))
        using (var expected = full(k, 1.0, dtype: ScalarType.Float64))
        {
            c.Broadcast(x, root: 0);
            Expect(x, expected, "broadcast from rank 0");
        }
        // All-to-all: rank r sends 1 + (r + p) % 2 rows of 3 to peer p (rows valued r + 1), so the counts differ by pair.
        long[] rows = [.. Enumerable.Range(0, n).Select(p => 1L + (r + p) % 2)];
        using (var input = full(rows.Sum(), 3, r + 1, dtype: ScalarType.Float32, device: device))
        using (var output = empty(rows.Sum(), 3, dtype: ScalarType.Float32, device: device))
        using (var expected = cat(Enumerable.Range(0, n).Select(p => full(rows[p], 3, p + 1.0, dtype: ScalarType.Float64)).ToArray(), 0))
        {
            c.AllToAll(input, rows, output, rows);
            Expect(output, expected, "all-to-all");
        }
        if (n < 2) return;
        // Send/recv around the ring: each rank sends its value to the next, receives the previous one's.
        using (var mine = full(k, r + 1, dtype: ScalarType.Float32, device: device))
        using (var got = empty(k, dtype: ScalarType.Float32, device: device))
        using (var expected = full(k, (r + n - 1) % n + 1.0, dtype: ScalarType.Float64))
        {
            if (r % 2 == 0) { c.Send(mine, (r + 1) % n); c.Recv(got, (r + n - 1) % n); }
            else { c.Recv(got, (r + n - 1) % n); c.Send(mine, (r + 1) % n); }
            Expect(got, expected, "send/recv around the ring");
        }
    }

    /// <summary>
    /// The async checkpoint's device-to-host copy (HostCopy into ShardedCheckpointWriter.NewHostBuffer's page-locked
    /// buffer): 64 MB from the GPU into pinned host memory, checked element by element. Pinning may be refused (a
    /// locked-memory limit); the checkpoint then copies through pageable memory, slower: said here, not an error.
    /// </summary>
    static string PinnedHostCopy(Device device)
    {
        const long elements = 1 << 24; // 64 MB of float32; integers up to 2^24 are exact
        using var source = arange(elements, dtype: ScalarType.Float32, device: device);
        using var pageable = empty(elements, dtype: ScalarType.Float32);
        Tensor host;
        try { host = pageable.pin_memory(); }
        catch (Exception e) when (e is ExternalException or InvalidOperationException)
        {
            return $"not granted ({e.Message.Split('\n')[0]}): the async checkpoint copies through pageable memory";
        }
        using (host)
        {
            if (!host.is_pinned()) return "pin_memory returned pageable memory: the async checkpoint copies through it";
            cuda.synchronize(device);
            var clock = Stopwatch.StartNew();
            host.copy_(source);
            double seconds = clock.Elapsed.TotalSeconds;
            using var expected = arange(elements, dtype: ScalarType.Float32);
            using var same = host.eq(expected).all();
            if (!same.item<bool>()) throw new InvalidOperationException($"the copy from {device} into pinned host memory differs from the source");
            return $"64 MB from {device} into page-locked host memory, as the async checkpoint copies: exact, {elements * 4 / seconds / 1e9:0.0} GB/s";
        }
    }

    static void Line(TextWriter output, string label, string text) => output.WriteLine($"  {label,-12} {text}");
}
