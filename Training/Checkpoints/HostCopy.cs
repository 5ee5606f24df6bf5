// The host copy of a rank's checkpoint slices, shared out in pieces of up to 8 MiB among whichever threads help.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// The copy <see cref="ShardedCheckpointWriter.CopyToHost"/> makes, as a list of pieces (row runs of the slices) any
/// number of threads take turns on (<see cref="Help"/>): a background thread can start it while the training thread runs the next forward and
/// backward pass (which read the parameters but change none), and the training thread joins in when it needs the copy
/// done (before the optimizer update). Buffers of <c>reuse</c> with the right name, shape and dtype are refilled in place.
/// The live tensors must not change until <see cref="Completed"/>; <see cref="Take"/> hands over the snapshot.
/// </summary>
internal sealed class HostCopy : IDisposable
{
    /// <summary>
    /// Most bytes one thread copies before it takes the next piece: small enough that a thread asked to finish the
    /// snapshot (the training thread, before its optimizer update) never waits long on a low-priority thread's piece.
    /// </summary>
    internal const long PieceBytes = 8L << 20;

    /// <summary>A run of rows of one slice (all of a 0-dimensional one: <c>Rows</c> = -1).</summary>
    readonly record struct Piece(int Slice, long From, long Rows);

    readonly long step;
    readonly int rank;
    readonly IReadOnlyDictionary<string, Tensor> tensors;
    readonly TensorSlice[] slices;
    readonly Piece[] pieces;
    readonly ShardingPlan plan;
    readonly Tensor?[] buffers;   // what each slice is copied into: a reused buffer until it is checked, then the result
    readonly bool[] checkedBuffer;
    readonly Lock gate = new();
    readonly Tensor?[] unused;    // reused buffers that do not fit, disposed once the copy is over
    int next = -1, finished;
    Exception? failure;
    readonly TaskCompletionSource done = new(TaskCreationOptions.RunContinuationsAsynchronously);
    bool taken;

    public HostCopy(ShardingPlan plan, int rank, long step, IReadOnlyDictionary<string, Tensor> tensors, HostSnapshot? reuse)
    {
        this.step = step;
        this.rank = rank;
        this.tensors = tensors;
        this.plan = plan;
        slices = plan.WritesOf(rank).ToArray();
        buffers = new Tensor?[slices.Length];
        checkedBuffer = new bool[slices.Length];
        var previous = (reuse?.TakeSlices() ?? []).ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        for (int i = 0; i < slices.Length; i++)
            if (previous.Remove(slices[i].Name, out var b)) buffers[i] = b;
        unused = [.. previous.Values];
        pieces = Pieces(slices, tensors).ToArray();
        if (pieces.Length == 0) Finish();
    }

    /// <summary>
    /// Each slice as runs of rows of at most <see cref="PieceBytes"/> (at least one row). A slice whose tensor is missing
    /// is one piece, whose copy fails with the error naming it.
    /// </summary>
    static IEnumerable<Piece> Pieces(TensorSlice[] slices, IReadOnlyDictionary<string, Tensor> tensors)
    {
        for (int i = 0; i < slices.Length; i++)
        {
            var s = slices[i];
            if (!tensors.TryGetValue(s.Name, out var t) || t.dim() == 0 || s.RowCount == 0)
            {
                yield return new Piece(i, 0, -1);
                continue;
            }
            long rowBytes = Math.Max(1, t.numel() / Math.Max(1, t.shape[0]) * t.ElementSize);
            long perPiece = Math.Max(1, PieceBytes / rowBytes);
            for (long from = 0; from < s.RowCount; from += perPiece)
                yield return new Piece(i, from, Math.Min(perPiece, s.RowCount - from));
        }
    }

    /// <summary>Done (or failed): every thread that helped is out of the live tensors.</summary>
    public Task Completed => done.Task;

    public long Step => step;

    public long Bytes { get; private set; }

    /// <summary>Copies pieces until none is left to start; returns when this thread has no more to do (others may still copy).</summary>
    public void Help()
    {
        using var noGrad = no_grad();
        for (int i; Volatile.Read(ref failure) is null && (i = Interlocked.Increment(ref next)) < pieces.Length;)
        {
            try { CopyOne(pieces[i]); }
            catch (Exception e) { Interlocked.CompareExchange(ref failure, e, null); }
            if (Interlocked.Increment(ref finished) == pieces.Length) Finish();
        }
        // A failure stops the others taking new pieces: account for those never started so Completed still fires.
        if (Volatile.Read(ref failure) is not null)
            for (int i; (i = Interlocked.Increment(ref next)) < pieces.Length;)
                if (Interlocked.Increment(ref finished) == pieces.Length) Finish();
    }

    void CopyOne(Piece p)
    {
        var s = slices[p.Slice];
        var t = ShardedCheckpointWriter.Lookup(tensors, s.Name);
        using var view = ShardedCheckpointWriter.RowsOf(plan, t, s);
        var buffer = BufferFor(p.Slice, view);
        if (p.Rows < 0)
        {
            Copy(buffer, view);
            return;
        }
        using var from = view.narrow(0, p.From, p.Rows);
        using var into = buffer.narrow(0, p.From, p.Rows);
        Copy(into, from);
    }

    /// <summary>
    /// The slice's buffer, checked (or made) by the first piece of the slice to get here: a reused one of the wrong dtype
    /// or shape is replaced. Making one only reserves memory (the pages fault in as they are copied into), so one lock
    /// for all slices costs the other threads next to nothing.
    /// </summary>
    Tensor BufferFor(int i, Tensor view)
    {
        lock (gate)
        {
            var buffer = buffers[i];
            if (!checkedBuffer[i])
            {
                if (buffer is null || buffer.dtype != view.dtype || !buffer.shape.SequenceEqual(view.shape))
                {
                    buffer?.Dispose();
                    buffers[i] = null;
                    buffer = buffers[i] = ShardedCheckpointWriter.NewHostBuffer(view);
                }
                checkedBuffer[i] = true;
            }
            return buffer!;
        }
    }

    /// <summary>
    /// CPU to CPU a plain memory copy on this thread: a tensor copy would hand large copies to torch's intra-op threads,
    /// which run at the training's priority whatever this thread's is. Anything else (a GPU's DMA copy) through torch.
    /// </summary>
    static void Copy(Tensor into, Tensor from)
    {
        if (from.device_type == DeviceType.CPU && from.is_contiguous() && into.is_contiguous() && from.dtype == into.dtype && from.numel() > 0)
            from.bytes.CopyTo(into.bytes);
        else into.copy_(from);
    }

    void Finish()
    {
        foreach (var u in unused) u?.Dispose();
        if (failure is null) Bytes = buffers.Sum(b => b!.numel() * b.ElementSize);
        done.TrySetResult();
    }

    /// <summary>The finished snapshot (this copy owns nothing afterwards); throws the copy's failure.</summary>
    public HostSnapshot Take()
    {
        if (!Completed.IsCompleted) throw new InvalidOperationException($"the host copy of step {step} is still running");
        if (failure is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
        taken = true;
        return new HostSnapshot(step, rank, slices.Select((s, i) => new KeyValuePair<string, Tensor>(s.Name, buffers[i]!)).ToList());
    }

    public void Dispose()
    {
        if (taken) return;
        if (!Completed.IsCompleted) throw new InvalidOperationException($"the host copy of step {step} is disposed while threads still copy");
        foreach (var b in buffers) b?.Dispose();
        Array.Clear(buffers);
    }
}
