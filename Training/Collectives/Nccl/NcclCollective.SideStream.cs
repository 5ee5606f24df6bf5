// The all-reduce that overlaps the backward on a GPU: enqueued on a stream of its own after the gradients' kernels
// (an event on the default stream), waited for once at the end. Not the blocking calls of ICollective (NcclCollective.cs).
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives.Nccl;

public sealed partial class NcclCollective
{
    IntPtr sideStream, computed, sideDone; // a NON_BLOCKING stream; the default stream's "gradients written" event; the side stream's last launch
    int sideLaunches;
    [ThreadStatic] static int currentOrdinal; // ordinal + 1 whose primary context this thread made current (0: none yet)

    /// <summary>
    /// Enqueues an in-place all-reduce of <paramref name="tensor"/> on this collective's side stream, ordered after every
    /// kernel enqueued on the default stream so far (the kernels that wrote it: an event recorded there, which the side
    /// stream waits on), and returns at once: the compute goes on while NCCL runs. The side stream does not synchronize
    /// with the default stream implicitly (NON_BLOCKING), so nothing on the default stream may touch the tensor until
    /// <see cref="WaitForSideStream"/>. Every rank launches the same all-reduces in the same order.
    /// </summary>
    public void AllReduceAfterCompute(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        var p = Data(tensor, "all-reduce");
        lock (gate)
        {
            if (fault is not null)
                throw new CollectiveException(fault.Failure, $"all-reduce refused: this collective failed earlier; form a new generation ({fault.Message})", inner: fault);
            if (comm == IntPtr.Zero) throw new ObjectDisposedException(nameof(NcclCollective));
            EnsureSideStream();
            Driver(NcclNative.cuEventRecord(computed, IntPtr.Zero), "cuEventRecord (default stream)");
            Driver(NcclNative.cuStreamWaitEvent(sideStream, computed, 0), "cuStreamWaitEvent");
            int result = NcclNative.ncclAllReduce(p, p, (nuint)tensor.numel(), DataType(tensor.dtype), RedOp(op), comm, sideStream);
            if (result != NcclNative.Success && result != NcclNative.InProgress) throw Fail("all-reduce", $"returned {NcclNative.ErrorString(result, comm)}");
            Driver(NcclNative.cuEventRecord(sideDone, sideStream), "cuEventRecord (side stream)");
            sideLaunches++;
            inFlight = true;
        }
    }

    /// <summary>
    /// Waits (on the waiter thread, under the watchdog: a dead peer aborts the communicator and throws) until every
    /// all-reduce launched by <see cref="AllReduceAfterCompute"/> has run; then the default stream may read their tensors.
    /// </summary>
    public void WaitForSideStream()
    {
        IntPtr done;
        lock (gate)
        {
            if (sideLaunches == 0) return;
            if (comm == IntPtr.Zero) throw fault ?? new CollectiveException(CollectiveFailure.Unavailable, "all-reduce refused: the collective was disposed");
            sideLaunches = 0;
            done = sideDone;
            inFlight = true;
        }
        WaitUnderWatchdog("all-reduce", () =>
        {
            int r = NcclNative.cuEventSynchronize(done);
            if (r != 0) throw new CollectiveException(CollectiveFailure.PeerStalled, $"NCCL all-reduce on rank {Rank}/{WorldSize} (generation {Generation}): cuEventSynchronize failed (CUDA driver error {r})");
        });
    }

    /// <summary>The side stream and its two events, made on first use (call under the gate) on the collective's device.</summary>
    void EnsureSideStream()
    {
        int ordinal = Math.Max(0, (int)Device.index);
        if (currentOrdinal != ordinal + 1)
        {
            NcclNative.MakeDeviceCurrent(ordinal); // the driver API uses the thread's current context (the backward may run on an engine thread)
            currentOrdinal = ordinal + 1;
        }
        if (sideStream != IntPtr.Zero) return;
        Driver(NcclNative.cuStreamCreate(out sideStream, NcclNative.StreamNonBlocking), "cuStreamCreate");
        Driver(NcclNative.cuEventCreate(out computed, NcclNative.EventDisableTiming), "cuEventCreate");
        Driver(NcclNative.cuEventCreate(out sideDone, NcclNative.EventDisableTiming), "cuEventCreate");
    }

    void DisposeSideStream()
    {
        lock (gate)
        {
            // Destroying a stream with work queued returns at once and frees it when the work is done (CUDA's contract).
            if (computed != IntPtr.Zero) NcclNative.cuEventDestroy(computed);
            if (sideDone != IntPtr.Zero) NcclNative.cuEventDestroy(sideDone);
            if (sideStream != IntPtr.Zero) NcclNative.cuStreamDestroy(sideStream);
            computed = sideDone = sideStream = IntPtr.Zero;
        }
    }

    /// <summary>A failed driver call while enqueueing (under the gate): the communicator is aborted, as for a failed NCCL call.</summary>
    void Driver(int result, string call)
    {
        if (result != 0) throw Fail("all-reduce", $"failed in {call} (CUDA driver error {result})");
    }
}
