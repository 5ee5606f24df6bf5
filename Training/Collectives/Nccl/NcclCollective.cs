// NCCL collectives on CUDA tensors through P/Invoke, with a watchdog so that a dead peer fails an operation instead of hanging it.
using System.Diagnostics;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives.Nccl;

/// <summary>
/// The nccl backend. One communicator per generation, formed from a 128-byte unique id that rank 0 creates
/// (<see cref="CreateUniqueId"/>) and the coordinator hands to every rank.
/// <para>
/// Stream: every call is enqueued on the legacy default CUDA stream (stream argument 0), which is the stream TorchSharp's
/// own kernels use, so the collective is ordered after the kernels that produced the gradients and before those that
/// read them, with no event plumbing. The call then waits for the device (torch.cuda.synchronize on the collective's one
/// waiter thread, <see cref="SerialWaiter"/>)
/// while polling ncclCommGetAsyncError; past the timeout, or on an asynchronous error, it calls ncclCommAbort, which makes
/// the stuck kernels exit, and throws. NCCL does not say which peer failed, so the exception names this rank and the
/// operation; the coordinator's heartbeats name the dead worker.
/// </para>
/// </summary>
public sealed partial class NcclCollective : ICollective
{
    public int Rank { get; }
    public int WorldSize { get; }
    public long Generation { get; }
    public Device Device { get; }
    public TimeSpan Timeout { get; }

    // comm is read and cleared under the gate: Dispose may come from another thread (a cancelled run) while an operation
    // polls the communicator, and then aborts it rather than destroying it under kernels that wait for peers.
    readonly Lock gate = new();
    readonly SerialWaiter waiter;
    IntPtr comm;
    bool inFlight;
    CollectiveException? fault;

    NcclCollective(IntPtr comm, int rank, int worldSize, long generation, Device device, TimeSpan timeout)
    {
        this.comm = comm;
        Rank = rank;
        WorldSize = worldSize;
        Generation = generation;
        Device = device;
        Timeout = timeout;
        waiter = new SerialWaiter($"nccl waiter {rank}/{worldSize}");
    }

    /// <summary>Creates the group's unique id (on the rank that brokers it, usually rank 0): 128 opaque bytes.</summary>
    public static byte[] CreateUniqueId()
    {
        EnsureLibrary();
        Check(NcclNative.ncclGetUniqueId(out var id), "ncclGetUniqueId");
        var bytes = new byte[NcclNative.UniqueIdBytes];
        unsafe { new ReadOnlySpan<byte>(id.Internal, NcclNative.UniqueIdBytes).CopyTo(bytes); }
        return bytes;
    }

    /// <summary>
    /// Forms a communicator of one rank on the current CUDA device and destroys it again: null when NCCL can, else NCCL's
    /// own account of why not (its result and last error; without a GPU, the CUDA failure it met). <c>gpu-worker check</c>
    /// prints it, so a driver too old for NCCL's CUDA runtime is named before a job fails on it.
    /// </summary>
    public static string? TryCommunicatorOfOne()
    {
        EnsureLibrary();
        Check(NcclNative.ncclGetUniqueId(out var id), "ncclGetUniqueId");
        int result = NcclNative.ncclCommInitRank(out var comm, 1, id, 0);
        if (result != NcclNative.Success) return NcclNative.ErrorString(result);
        NcclNative.ncclCommDestroy(comm);
        return null;
    }

    /// <summary>Joins the communicator of <paramref name="uniqueId"/> as <paramref name="rank"/>; every rank must call this within the timeout.</summary>
    public static NcclCollective Create(byte[] uniqueId, int rank, int worldSize, long generation, Device device, TimeSpan timeout)
    {
        if (device.type != DeviceType.CUDA)
            throw new ArgumentException($"the nccl backend works on CUDA devices, not {device.type}; use the tcp backend for CPU tensors");
        if (!cuda.is_available())
            throw new CollectiveException(CollectiveFailure.Unavailable,
                "the nccl backend needs CUDA, and this process has none (no GPU, no driver, or the TorchSharp-cpu build); use the tcp backend for CPU tensors");
        EnsureLibrary();
        if (uniqueId.Length != NcclNative.UniqueIdBytes)
            throw new ArgumentException($"an NCCL unique id is {NcclNative.UniqueIdBytes} bytes, got {uniqueId.Length}", nameof(uniqueId));
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must be in [0, {worldSize})");

        int ordinal = Math.Max(0, (int)device.index);
        // ncclCommInitRank blocks until every rank has joined and has no timeout of its own: run it on a thread and
        // give up after the timeout (the thread stays blocked inside NCCL; the process is expected to start over).
        var init = Task.Factory.StartNew(() =>
        {
            NcclNative.MakeDeviceCurrent(ordinal);
            NcclNative.UniqueId id = default;
            unsafe { uniqueId.CopyTo(new Span<byte>(id.Internal, NcclNative.UniqueIdBytes)); }
            Check(NcclNative.ncclCommInitRank(out var c, worldSize, id, rank), "ncclCommInitRank");
            return c;
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        try
        {
            if (!init.Wait(timeout))
                throw new CollectiveException(CollectiveFailure.PeerStalled,
                    $"ncclCommInitRank of rank {rank}/{worldSize} (generation {generation}) did not complete within {timeout.TotalSeconds:0.#} s: some rank did not join");
        }
        catch (AggregateException e) when (e.InnerException is CollectiveException inner) { throw inner; }
        catch (AggregateException e) when (e.InnerException is DllNotFoundException missing)
        {
            throw new CollectiveException(CollectiveFailure.Unavailable, $"the nccl backend needs the CUDA driver (libcuda.so.1): {missing.Message}", inner: missing);
        }
        return new NcclCollective(init.Result, rank, worldSize, generation, device, timeout);
    }

    // ---- Operations ----

    public void AllReduce(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        var p = Data(tensor, "all-reduce");
        Run("all-reduce", () => NcclNative.ncclAllReduce(p, p, (nuint)tensor.numel(), DataType(tensor.dtype), RedOp(op), comm, IntPtr.Zero));
    }

    public void ReduceScatter(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum)
    {
        if (input.numel() != output.numel() * WorldSize)
            throw new ArgumentException($"reduce-scatter input has {input.numel()} elements; expected world size x output = {WorldSize} x {output.numel()}");
        IntPtr src = Data(input, "reduce-scatter"), dst = Data(output, "reduce-scatter");
        Run("reduce-scatter", () => NcclNative.ncclReduceScatter(src, dst, (nuint)output.numel(), DataType(input.dtype), RedOp(op), comm, IntPtr.Zero));
    }

    public void AllGather(Tensor input, Tensor output)
    {
        if (output.numel() != input.numel() * WorldSize)
            throw new ArgumentException($"all-gather output has {output.numel()} elements; expected world size x input = {WorldSize} x {input.numel()}");
        IntPtr src = Data(input, "all-gather"), dst = Data(output, "all-gather");
        Run("all-gather", () => NcclNative.ncclAllGather(src, dst, (nuint)input.numel(), DataType(input.dtype), comm, IntPtr.Zero));
    }

    /// <summary>One NCCL group of a send and a receive per peer (ncclSend/ncclRecv), so every pair's exchange runs at once.</summary>
    public void AllToAll(Tensor input, long[] sendRows, Tensor output, long[] receiveRows)
    {
        var (rowElements, _) = AllToAllPlan.Check(input, sendRows, output, receiveRows, WorldSize);
        IntPtr src = Data(input, "all-to-all"), dst = Data(output, "all-to-all");
        int type = DataType(input.dtype);
        long bytesPerRow = rowElements * input.element_size();
        Run("all-to-all", () =>
        {
            int r = NcclNative.ncclGroupStart();
            if (r != NcclNative.Success) return r;
            long sent = 0, received = 0;
            int inner = NcclNative.Success;
            for (int peer = 0; peer < WorldSize && inner == NcclNative.Success; peer++)
            {
                if (sendRows[peer] > 0)
                    inner = NcclNative.ncclSend(src + (nint)(sent * bytesPerRow), (nuint)(sendRows[peer] * rowElements), type, peer, comm, IntPtr.Zero);
                if (inner == NcclNative.Success && receiveRows[peer] > 0)
                    inner = NcclNative.ncclRecv(dst + (nint)(received * bytesPerRow), (nuint)(receiveRows[peer] * rowElements), type, peer, comm, IntPtr.Zero);
                sent += sendRows[peer];
                received += receiveRows[peer];
            }
            r = NcclNative.ncclGroupEnd();
            return inner != NcclNative.Success ? inner : r;
        });
    }

    public void Broadcast(Tensor tensor, int root)
    {
        var p = Data(tensor, "broadcast");
        Run("broadcast", () => NcclNative.ncclBroadcast(p, p, (nuint)tensor.numel(), DataType(tensor.dtype), root, comm, IntPtr.Zero));
    }

    public void Send(Tensor tensor, int peer)
    {
        var p = Data(tensor, "send");
        Run("send", () => Grouped(() => NcclNative.ncclSend(p, (nuint)tensor.numel(), DataType(tensor.dtype), peer, comm, IntPtr.Zero)));
    }

    public void Recv(Tensor tensor, int peer)
    {
        var p = Data(tensor, "recv");
        Run("recv", () => Grouped(() => NcclNative.ncclRecv(p, (nuint)tensor.numel(), DataType(tensor.dtype), peer, comm, IntPtr.Zero)));
    }

    public void Barrier()
    {
        using var token = ones(1, dtype: ScalarType.Float32, device: Device);
        AllReduce(token);
    }

    static int Grouped(Func<int> call)
    {
        int r = NcclNative.ncclGroupStart();
        if (r != NcclNative.Success) return r;
        int inner = call();
        r = NcclNative.ncclGroupEnd();
        return inner != NcclNative.Success ? inner : r;
    }

    /// <summary>Enqueues one NCCL call on the default stream and waits for it under the watchdog.</summary>
    void Run(string op, Func<int> enqueue)
    {
        lock (gate)
        {
            if (fault is not null)
                throw new CollectiveException(fault.Failure, $"{op} refused: this collective failed earlier; form a new generation ({fault.Message})", inner: fault);
            if (comm == IntPtr.Zero) throw new ObjectDisposedException(nameof(NcclCollective));
            int result = enqueue();
            if (result != NcclNative.Success && result != NcclNative.InProgress) throw Fail(op, $"returned {NcclNative.ErrorString(result, comm)}");
            inFlight = true;
        }
        var device = Device;
        WaitUnderWatchdog(op, () => cuda.synchronize(device));
    }

    /// <summary>Runs <paramref name="wait"/> on the waiter while polling the communicator's errors and the timeout (it aborts on either).</summary>
    void WaitUnderWatchdog(string op, Action wait)
    {
        try
        {
            var done = waiter.Submit(wait);
            var clock = Stopwatch.StartNew();
            while (!done.Wait(10))
                lock (gate)
                {
                    if (comm == IntPtr.Zero)
                        throw fault ?? new CollectiveException(CollectiveFailure.PeerStalled, $"NCCL {op} on rank {Rank}/{WorldSize} (generation {Generation}) was aborted: the collective was disposed");
                    if (NcclNative.ncclCommGetAsyncError(comm, out int asyncError) == NcclNative.Success && asyncError is not (NcclNative.Success or NcclNative.InProgress))
                        throw Fail(op, $"reported {NcclNative.ErrorString(asyncError, comm)} (a peer failed or its connection broke)");
                    if (clock.Elapsed > Timeout)
                        throw Fail(op, $"did not complete within {Timeout.TotalSeconds:0.#} s: a peer died or stalled");
                }
        }
        finally { lock (gate) inFlight = false; }
    }

    /// <summary>Aborts the communicator (kernels waiting for a dead peer exit) and records why; call under the gate.</summary>
    CollectiveException Fail(string op, string what)
    {
        var c = comm;
        comm = IntPtr.Zero;
        if (c != IntPtr.Zero) NcclNative.ncclCommAbort(c);
        fault = new CollectiveException(CollectiveFailure.PeerStalled,
            $"NCCL {op} on rank {Rank}/{WorldSize} (generation {Generation}) {what}");
        return fault;
    }

    IntPtr Data(Tensor tensor, string op)
    {
        if (tensor.device_type != DeviceType.CUDA)
            throw new ArgumentException($"the nccl collective works on CUDA tensors; {op} got a {tensor.device_type} tensor");
        if (!tensor.is_contiguous()) throw new ArgumentException($"{op} needs a contiguous tensor");
        return TensorMemory.DataPointer(tensor);
    }

    static int DataType(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => NcclNative.Float32,
        ScalarType.Float64 => NcclNative.Float64,
        ScalarType.BFloat16 => NcclNative.BFloat16,
        ScalarType.Float16 => NcclNative.Float16,
        ScalarType.Int64 => NcclNative.Int64,
        _ => throw new ArgumentException($"the nccl collective does not support dtype {dtype}"),
    };

    static int RedOp(ReduceOp op) => op switch
    {
        ReduceOp.Sum => NcclNative.Sum,
        ReduceOp.Avg => NcclNative.Avg,
        ReduceOp.Max => NcclNative.Max,
        _ => throw new ArgumentOutOfRangeException(nameof(op), op, null),
    };

    static void Check(int result, string call)
    {
        if (result != NcclNative.Success)
            throw new CollectiveException(CollectiveFailure.Unavailable, $"{call} failed: {NcclNative.ErrorString(result)}");
    }

    /// <summary>
    /// What the loader finds of NCCL here: the file, its version, and the entry points this backend calls that it lacks.
    /// <c>gpu-worker check</c> prints it; <see cref="Create"/> and <see cref="CreateUniqueId"/> refuse to start without a
    /// usable library, with one clear message instead of a DllNotFoundException or EntryPointNotFoundException mid-run.
    /// The loader's answer does not change while the process runs, so it is found once.
    /// </summary>
    public static NcclLibraryInfo Inspect() => Library.Value;

    static readonly Lazy<NcclLibraryInfo> Library = new(InspectLoader);

    static NcclLibraryInfo InspectLoader()
    {
        if (!NativeLibrary.TryLoad(NcclNative.Library, typeof(NcclCollective).Assembly, null, out var handle))
            return new NcclLibraryInfo(null, 0, 0, [],
                $"{NcclNative.Library} could not be loaded: install NCCL {NcclNative.VersionText(NcclNative.MinimumVersion)} or newer (Debian/Ubuntu: libnccl2) or add its folder to LD_LIBRARY_PATH");
        var missing = NcclNative.EntryPoints.Where(e => !NcclNative.OptionalEntryPoints.Contains(e) && !NativeLibrary.TryGetExport(handle, e, out _)).Order().ToList();
        string? path = SharedLibrary.PathOf(handle, nameof(NcclNative.ncclGetVersion));
        int version = 0;
        if (!missing.Contains(nameof(NcclNative.ncclGetVersion))) NcclNative.ncclGetVersion(out version);
        var where = path ?? NcclNative.Library;
        string? problem =
            missing.Count > 0 ? $"{where} lacks {string.Join(", ", missing)}, which the nccl backend calls: install NCCL {NcclNative.VersionText(NcclNative.MinimumVersion)} or newer"
            : version < NcclNative.MinimumVersion ? $"{where} is NCCL {NcclNative.VersionText(version)}; the nccl backend needs {NcclNative.VersionText(NcclNative.MinimumVersion)} or newer (ncclAvg, bfloat16)"
            : null;
        return new NcclLibraryInfo(path, version, NcclNative.EntryPoints.Count(e => !NcclNative.OptionalEntryPoints.Contains(e)), missing, problem);
    }

    static void EnsureLibrary()
    {
        if (Inspect().Problem is { } problem) throw new CollectiveException(CollectiveFailure.Unavailable, $"the nccl backend cannot start: {problem}");
    }

    /// <summary>
    /// Destroys the communicator; while an operation waits on it (another thread: a cancelled run), aborts it instead,
    /// since ncclCommDestroy would wait for kernels that wait for peers, and the waiting operation throws.
    /// </summary>
    public void Dispose()
    {
        waiter.Dispose();
        DisposeSideStream();
        lock (gate)
        {
            var c = comm;
            comm = IntPtr.Zero;
            if (c == IntPtr.Zero) return;
            if (inFlight) NcclNative.ncclCommAbort(c);
            else NcclNative.ncclCommDestroy(c);
        }
    }
}

/// <summary>NCCL as the loader finds it (<see cref="NcclCollective.Inspect"/>).</summary>
/// <param name="Path">The file libnccl.so.2 resolved to, or null when it did not load.</param>
/// <param name="VersionCode">ncclGetVersion's code (22203 is 2.22.3); 0 when it did not load.</param>
/// <param name="Required">How many libnccl entry points the nccl backend calls; 0 when the library did not load.</param>
/// <param name="Missing">Those the file lacks.</param>
/// <param name="Problem">Why the nccl backend cannot use it, or null when it can.</param>
public sealed record NcclLibraryInfo(string? Path, int VersionCode, int Required, IReadOnlyList<string> Missing, string? Problem)
{
    /// <summary>Whether libnccl.so.2 loaded at all (a loaded file can still be unusable: see <see cref="Problem"/>).</summary>
    public bool Loaded => Required > 0;
    public string Version => NcclNative.VersionText(VersionCode);
}
