// Raw access to a tensor's storage for the backends: its data pointer (host or device) and element size.
using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

internal static partial class TensorMemory
{
    // LibTorchSharp exports the data pointer of a tensor (storage offset included); TorchSharp has no public accessor for it.
    [DllImport("LibTorchSharp")]
    static extern IntPtr THSTensor_data(IntPtr handle);

    public static IntPtr DataPointer(Tensor tensor) => THSTensor_data(tensor.Handle);

    public static int ElementSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 4,
        ScalarType.Float64 => 8,
        ScalarType.BFloat16 => 2,
        ScalarType.Float16 => 2,
        ScalarType.Int64 => 8,
        ScalarType.Int32 => 4,
        _ => throw new ArgumentException($"collectives do not support dtype {dtype}"),
    };
}

/// <summary>
/// A contiguous alias of a tensor for the duration of one operation: the tensor itself when it is contiguous, else a
/// contiguous copy that <see cref="Dispose"/> writes back (when <c>writeBack</c>).
/// </summary>
internal sealed class ContiguousView : IDisposable
{
    readonly Tensor original;
    readonly bool writeBack;
    public Tensor Tensor { get; }
    public IntPtr Data { get; }
    public long Count { get; }

    public ContiguousView(Tensor tensor, bool writeBack)
    {
        original = tensor;
        this.writeBack = writeBack;
        Tensor = tensor.is_contiguous() ? tensor : tensor.contiguous().DetachFromDisposeScope();
        Data = TensorMemory.DataPointer(Tensor);
        Count = tensor.numel();
    }

    public void Dispose()
    {
        if (ReferenceEquals(Tensor, original)) return;
        if (writeBack)
        {
            using var noGrad = no_grad();
            original.copy_(Tensor);
        }
        Tensor.Dispose();
    }
}
