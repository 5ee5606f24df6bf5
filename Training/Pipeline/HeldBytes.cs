// The bytes a pipeline stage's held micro-batches keep: each live tensor's storage, counted once.
using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Pipeline;

static class HeldBytes
{
    /// <summary>Bytes of the storages behind the live tensors among <paramref name="held"/>, each storage once (views share their base's).</summary>
    public static long Of(List<IDisposable> held)
    {
        var storages = new Dictionary<IntPtr, long>();
        foreach (var t in held.OfType<Tensor>())
            if (!t.IsInvalid) storages[THSStorage_data_ptr(t.Handle)] = (long)THSStorage_nbytes(t.Handle);
        return storages.Values.Sum();
    }

    // LibTorchSharp's exports behind TorchSharp's Storage (which needs the element type): a tensor's storage and its size.
    [DllImport("LibTorchSharp")]
    static extern IntPtr THSStorage_data_ptr(IntPtr tensor);
    [DllImport("LibTorchSharp")]
    static extern ulong THSStorage_nbytes(IntPtr tensor);
}
