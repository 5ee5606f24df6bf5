// Ring collectives over TCP for CPU tensors: all-reduce = reduce-scatter + all-gather, chunked and pipelined, never hanging.
using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using TorchSharp;
using static TorchSharp.torch;

[assembly: InternalsVisibleTo("Training.Tests")]

namespace DeepSeekCluster.Training.Collectives.Tcp;

/// <summary>
/// The tcp backend. Rank r sends to r+1 and receives from r−1 over one connection each. A tensor of N elements is cut
/// into WorldSize balanced segments (the first N mod W one element longer) and each segment into chunks of
/// <see cref="TcpCollectiveOptions.ChunkBytes"/>; every chunk received is reduced and forwarded at once by a background
/// sender, so the 2(W−1) ring steps overlap instead of running one after another. The owner of a segment finishes it
/// (including the Avg division) and the all-gather spreads its bytes, so every rank ends bit-identical.
/// <para>
/// Failures: a rank that sees nothing from its predecessor for 0.9·Timeout suspects it, tells its successor (an abort
/// frame travels down the ring, carrying the suspect's rank and address) and listens 0.1·Timeout more for a better
/// verdict from upstream, so all ranks name the rank where the ring really stopped. A predecessor's closed connection is
/// a definite verdict and travels at once; a successor's is not (it may have closed after a failure upstream of it), so
/// the rank listens for the grace as after a stall. Either way the operation throws within Timeout of the last progress.
/// That failure path lives in TcpCollective.Failures.cs; this file is the data path.
/// </para>
/// </summary>
public sealed unsafe partial class TcpCollective : ICollective
{
    const int PollSliceMicros = 20_000;

    public int Rank => rendezvous.Rank;
    public int WorldSize => rendezvous.WorldSize;
    public long Generation => rendezvous.Generation;
    public string JobId => rendezvous.JobId;
    public Device Device => CPU;
    public TcpCollectiveOptions Options { get; }
    public TcpRendezvous Rendezvous => rendezvous;

    /// <summary>Test hook: called after each data frame is received (a test kills a rank in the middle of an operation).</summary>
    internal Action? FrameReceived { get; set; }

    /// <summary>Test hook: called each poll slice in which a receive finds nothing to read (a test cancels a rank blocked on a silent peer).</summary>
    internal Action? ReceiveWaiting { get; set; }

    readonly TcpRendezvous rendezvous;
    readonly IReadOnlyList<string> addresses;
    readonly PeerLink? next, prev;
    readonly Dictionary<int, PeerLink> pointToPoint = new();
    readonly byte[] scratch;
    readonly TimeSpan detectAfter, grace;
    PeerLink? sendingTo; // the link whose sender failure interrupts the current receive
    CollectiveException? fault;
    volatile bool disposed;

    internal TcpCollective(TcpRendezvous rendezvous, IReadOnlyList<string> addresses, PeerLink? next, PeerLink? prev, TcpCollectiveOptions options)
    {
        Options = options.Validated();
        this.rendezvous = rendezvous;
        this.addresses = addresses;
        this.next = next;
        this.prev = prev;
        scratch = GC.AllocateArray<byte>(options.ChunkBytes + 16, pinned: true);
        detectAfter = options.Timeout * 0.9;
        grace = options.Timeout * 0.1;
    }

    // ---- Public operations ----

    public void AllReduce(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        Begin("all-reduce", tensor);
        ElementReducer.Check(tensor.dtype, op);
        if (WorldSize == 1) return;
        using var view = new ContiguousView(tensor, writeBack: true);
        RunRing("all-reduce", () => Ring((byte*)view.Data, Segments(view.Count), tensor.dtype, op, gather: true));
    }

    public void ReduceScatter(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum)
    {
        Begin("reduce-scatter", input);
        Begin("reduce-scatter", output);
        ElementReducer.Check(input.dtype, op);
        if (output.dtype != input.dtype) throw new ArgumentException($"reduce-scatter output dtype {output.dtype} differs from input dtype {input.dtype}");
        long n = output.numel();
        if (input.numel() != n * WorldSize)
            throw new ArgumentException($"reduce-scatter input has {input.numel()} elements; expected world size x output = {WorldSize} x {n}");
        using var noGrad = no_grad();
        using var contiguous = input.contiguous();
        using var flat = contiguous.reshape(-1);
        using var work = flat.clone();
        if (WorldSize > 1)
            RunRing("reduce-scatter", () => Ring((byte*)TensorMemory.DataPointer(work), Segments(work.numel()), input.dtype, op, gather: false));
        using var part = work.narrow(0, Rank * n, n);
        output.copy_(part.view(output.shape));
    }

    public void AllGather(Tensor input, Tensor output)
    {
        Begin("all-gather", input);
        Begin("all-gather", output);
        ElementReducer.Check(input.dtype, ReduceOp.Sum);
        if (output.dtype != input.dtype) throw new ArgumentException($"all-gather output dtype {output.dtype} differs from input dtype {input.dtype}");
        long n = input.numel();
        if (output.numel() != n * WorldSize)
            throw new ArgumentException($"all-gather output has {output.numel()} elements; expected world size x input = {WorldSize} x {n}");
        using var noGrad = no_grad();
        using var view = new ContiguousView(output, writeBack: true);
        using (var flat = view.Tensor.view(-1))
        using (var own = flat.narrow(0, Rank * n, n))
        using (var src = input.reshape(-1))
            own.copy_(src);
        if (WorldSize > 1)
            RunRing("all-gather", () => Ring((byte*)view.Data, Segments(view.Count), input.dtype, null, gather: true));
    }

    public void Broadcast(Tensor tensor, int root)
    {
        Begin("broadcast", tensor);
        CheckPeer(root, nameof(root), allowSelf: true);
        ElementReducer.Check(tensor.dtype, ReduceOp.Sum);
        if (WorldSize == 1) return;
        using var view = new ContiguousView(tensor, writeBack: Rank != root);
        RunRing("broadcast", () =>
        {
            int es = TensorMemory.ElementSize(tensor.dtype);
            byte* data = (byte*)view.Data;
            sendingTo = next!;
            foreach (var (offset, count) in Chunks(0, view.Count, es))
            {
                byte* at = data + offset * es;
                if (Rank != root) ReceiveFrame(prev!, at, count * es);
                if (next!.Rank != root) next.Post(at, count * es);
            }
            AwaitSent(next!);
        });
    }

    public void Send(Tensor tensor, int peer)
    {
        Begin("send", tensor);
        CheckPeer(peer, nameof(peer), allowSelf: false);
        using var view = new ContiguousView(tensor, writeBack: false);
        int es = TensorMemory.ElementSize(tensor.dtype);
        RunPointToPoint("send", peer, link =>
        {
            sendingTo = link;
            foreach (var (offset, count) in Chunks(0, view.Count, es)) link.Post((byte*)view.Data + offset * es, count * es);
            AwaitSent(link);
        });
    }

    public void Recv(Tensor tensor, int peer)
    {
        Begin("recv", tensor);
        CheckPeer(peer, nameof(peer), allowSelf: false);
        using var view = new ContiguousView(tensor, writeBack: true);
        int es = TensorMemory.ElementSize(tensor.dtype);
        RunPointToPoint("recv", peer, link =>
        {
            sendingTo = null;
            foreach (var (offset, count) in Chunks(0, view.Count, es)) ReceiveFrame(link, (byte*)view.Data + offset * es, count * es);
        });
    }

    public void Barrier()
    {
        ThrowIfUnusable("barrier");
        if (WorldSize == 1) return;
        var tokens = GC.AllocateArray<long>(WorldSize, pinned: true); // one element per segment: every rank's token travels the whole ring
        RunRing("barrier", () =>
        {
            fixed (long* p = tokens) Ring((byte*)p, Segments(WorldSize), ScalarType.Int64, ReduceOp.Sum, gather: true);
        });
    }

    // ---- The ring ----

    /// <summary>
    /// Reduce-scatter (when <paramref name="reduce"/> is set) then all-gather (when <paramref name="gather"/>) over
    /// <paramref name="segments"/>. Reduce-scatter step s sends segment r−s−1 and receives r−s−2, so rank r ends owning
    /// segment r; all-gather step s sends r−s and receives r−s−1. Each received chunk is exactly the one sent next.
    /// </summary>
    void Ring(byte* data, (long Offset, long Count)[] segments, ScalarType dtype, ReduceOp? reduce, bool gather)
    {
        int w = WorldSize, r = Rank, es = TensorMemory.ElementSize(dtype);
        sendingTo = next!;
        fixed (byte* incoming = scratch)
        {
            if (reduce is { } op)
            {
                PostSegment(data, segments[Mod(r - 1)], es);
                for (int step = 0; step < w - 1; step++)
                {
                    bool last = step == w - 2;
                    var segment = segments[Mod(r - step - 2)];
                    foreach (var (offset, count) in Chunks(segment.Offset, segment.Count, es))
                    {
                        byte* at = data + offset * es;
                        ReceiveFrame(prev!, incoming, count * es);
                        ElementReducer.Combine(dtype, op, at, incoming, count);
                        if (last && op == ReduceOp.Avg) ElementReducer.Divide(dtype, at, count, w);
                        if (!last || gather) next!.Post(at, count * es);
                    }
                }
            }
            else PostSegment(data, segments[r], es);

            if (gather)
                for (int step = 0; step < w - 1; step++)
                {
                    var segment = segments[Mod(r - step - 1)];
                    foreach (var (offset, count) in Chunks(segment.Offset, segment.Count, es))
                    {
                        byte* at = data + offset * es;
                        ReceiveFrame(prev!, at, count * es);
                        if (step < w - 2) next!.Post(at, count * es);
                    }
                }
        }
        AwaitSent(next!); // the sender reads tensor memory until here
    }

    void PostSegment(byte* data, (long Offset, long Count) segment, int es)
    {
        foreach (var (offset, count) in Chunks(segment.Offset, segment.Count, es)) next!.Post(data + offset * es, count * es);
    }

    int Mod(int x) => ((x % WorldSize) + WorldSize) % WorldSize;

    (long Offset, long Count)[] Segments(long count)
    {
        var segments = new (long, long)[WorldSize];
        long size = count / WorldSize, extra = count % WorldSize, offset = 0;
        for (int i = 0; i < WorldSize; i++)
        {
            long length = size + (i < extra ? 1 : 0);
            segments[i] = (offset, length);
            offset += length;
        }
        return segments;
    }

    IEnumerable<(long Offset, int Count)> Chunks(long offset, long count, int elementSize)
    {
        long perChunk = Math.Max(1, Options.ChunkBytes / elementSize);
        for (long e = 0; e < count; e += perChunk) yield return (offset + e, (int)Math.Min(perChunk, count - e));
    }

    // ---- Frames ----

    void ReceiveFrame(PeerLink from, byte* destination, int length)
    {
        byte* header = stackalloc byte[8];
        ReceiveExactly(from, header, 8, payload: false);
        var kind = (FrameKind)(*(int*)header);
        int size = *(int*)(header + 4);
        if (kind == FrameKind.Abort && size is >= 0 and <= 1 << 20)
        {
            var payload = new byte[size];
            fixed (byte* p = payload) ReceiveExactly(from, p, size, payload: false);
            throw DecodeAbort(payload);
        }
        if (kind != FrameKind.Data || size != length)
            throw new CollectiveException(CollectiveFailure.Protocol,
                $"{from.Name} sent a {kind} frame of {size} bytes where rank {Rank} expected {length} bytes of data: the ranks called different operations, shapes or dtypes",
                from.Rank, from.Address);
        from.ReceiveRemaining = size;
        ReceiveExactly(from, destination, size, payload: true);
        FrameReceived?.Invoke();
    }

    /// <summary>
    /// Reads <paramref name="count"/> bytes. Without <paramref name="untilTimestamp"/>: throws when the peer closes, when
    /// it sends nothing for 0.9·Timeout, or when the sender of this operation failed. With it: returns false at that time.
    /// </summary>
    bool ReceiveExactly(PeerLink from, byte* destination, int count, bool payload, long? untilTimestamp = null)
    {
        long last = Stopwatch.GetTimestamp();
        while (count > 0)
        {
            if (disposed) throw Disposed();
            if (untilTimestamp is null && sendingTo?.SendFault is { } sendFault) throw sendFault;
            bool ready;
            try { ready = from.Socket.Available > 0 || from.Socket.Poll(PollSliceMicros, SelectMode.SelectRead); }
            catch (ObjectDisposedException) { throw Disposed(); }
            catch (SocketException e) { throw Lost(from, $"failed ({e.SocketErrorCode})", e); }
            if (!ready)
            {
                ReceiveWaiting?.Invoke();
                long now = Stopwatch.GetTimestamp();
                if (untilTimestamp is { } until) { if (now >= until) return false; }
                else if (Stopwatch.GetElapsedTime(last, now) >= detectAfter)
                    throw new CollectiveException(CollectiveFailure.PeerStalled,
                        $"{from.Name} sent nothing for {detectAfter.TotalSeconds:0.##} s (seen by rank {Rank})", from.Rank, from.Address);
                continue;
            }
            int got;
            SocketError error;
            try { got = from.Socket.Receive(new Span<byte>(destination, count), SocketFlags.None, out error); }
            catch (ObjectDisposedException) { throw Disposed(); }
            if (error != SocketError.Success) throw Lost(from, $"broke its connection ({error})");
            if (got == 0) throw Lost(from, "closed its connection");
            destination += got;
            count -= got;
            if (payload) from.ReceiveRemaining -= got;
            last = Stopwatch.GetTimestamp();
        }
        return true;
    }

    void AwaitSent(PeerLink link)
    {
        while (!link.WaitIdle(TimeSpan.FromMilliseconds(PollSliceMicros / 1000)))
        {
            if (link.SendFault is { } f) throw f;
            if (disposed) throw Disposed();
        }
    }

    // ---- Checks ----

    void Begin(string op, Tensor tensor)
    {
        ThrowIfUnusable(op);
        if (tensor.device_type != DeviceType.CPU)
            throw new ArgumentException($"the tcp collective works on CPU tensors; {op} got a {tensor.device_type} tensor (use the nccl backend for CUDA)");
    }

    void ThrowIfUnusable(string op)
    {
        if (disposed) throw Disposed();
        if (fault is not null)
            throw new CollectiveException(fault.Failure, $"{op} refused: this collective failed earlier and is unusable; form a new generation ({fault.Message})",
                fault.PeerRank, fault.PeerAddress, fault);
    }

    void CheckPeer(int peer, string name, bool allowSelf)
    {
        if (peer < 0 || peer >= WorldSize || (!allowSelf && peer == Rank))
            throw new ArgumentOutOfRangeException(name, peer, $"must be a rank in [0, {WorldSize}){(allowSelf ? "" : $" other than this rank {Rank}")}");
    }

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        next?.Dispose();
        prev?.Dispose();
        foreach (var link in pointToPoint.Values) link.Dispose();
        rendezvous.Dispose();
    }
}
