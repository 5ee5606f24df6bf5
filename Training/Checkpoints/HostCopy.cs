// The host copy of a rank's checkpoint slices, shared out tensor by tensor among whichever threads help.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// The copy <see cref="ShardedCheckpointWriter.CopyToHost"/> makes, as a list of slices any number of threads take
/// turns on (<see cref="Help"/>): a background thread can start it while the training thread runs the next forward and
/// backward pass (which read the parameters but change none), and the training thread joins in when it needs the copy
/// done (before the optimizer update). Buffers of <c>reuse</c> with the right name, shape and dtype are refilled in place.
/// The live tensors must not change until <see cref="Completed"/>; <see cref="Take"/> hands over the snapshot.
/// </summary>
internal sealed class HostCopy : IDisposable
{
    readonly long step;
    readonly int rank;
    readonly IReadOnlyDictionary<string, Tensor> tensors;
    readonly TensorSlice[] slices;
    readonly Tensor?[] buffers;   // what each slice is copied into: a reused buffer until its copy starts, then the result
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
        slices = plan.WritesOf(rank).ToArray();
        buffers = new Tensor?[slices.Length];
        var previous = (reuse?.TakeSlices() ?? []).ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        for (int i = 0; i < slices.Length; i++)
            if (previous.Remove(slices[i].Name, out var b)) buffers[i] = b;
        unused = [.. previous.Values];
        if (slices.Length == 0) Finish();
    }

    /// <summary>Done (or failed): every thread that helped is out of the live tensors.</summary>
    public Task Completed => done.Task;

    public long Step => step;

    public long Bytes { get; private set; }

    /// <summary>Copies slices until none is left to start; returns when this thread has no more to do (others may still copy).</summary>
    public void Help()
    {
        using var noGrad = no_grad();
        for (int i; Volatile.Read(ref failure) is null && (i = Interlocked.Increment(ref next)) < slices.Length;)
        {
            try { CopyOne(i); }
            catch (Exception e) { Interlocked.CompareExchange(ref failure, e, null); }
            if (Interlocked.Increment(ref finished) == slices.Length) Finish();
        }
        // A failure stops the others taking new slices: account for those never started so Completed still fires.
        if (Volatile.Read(ref failure) is not null)
            for (int i; (i = Interlocked.Increment(ref next)) < slices.Length;)
                if (Interlocked.Increment(ref finished) == slices.Length) Finish();
    }

    void CopyOne(int i)
    {
        var s = slices[i];
        var t = ShardedCheckpointWriter.Lookup(tensors, s.Name);
        using var view = t.dim() == 0 ? t.alias() : t.narrow(0, s.RowStart, s.RowCount);
        var buffer = buffers[i];
        if (buffer is null || buffer.dtype != view.dtype || !buffer.shape.SequenceEqual(view.shape))
        {
            buffer?.Dispose();
            buffers[i] = null;
            buffer = buffers[i] = ShardedCheckpointWriter.NewHostBuffer(view);
        }
        buffer.copy_(view);
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
