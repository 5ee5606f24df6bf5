// The argument checks every backend's all-to-all makes: per-peer row counts that fit the tensors, one dtype, one row size.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

static class AllToAllPlan
{
    /// <summary>Elements per row and the element size, after checking the counts against both tensors (errors name the numbers).</summary>
    public static (long RowElements, int ElementSize) Check(Tensor input, long[] sendRows, Tensor output, long[] receiveRows, int worldSize)
    {
        if (sendRows.Length != worldSize || receiveRows.Length != worldSize)
            throw new ArgumentException($"all-to-all needs one send and one receive count per rank ({worldSize}); got {sendRows.Length} and {receiveRows.Length}");
        if (sendRows.Any(n => n < 0) || receiveRows.Any(n => n < 0))
            throw new ArgumentException($"all-to-all counts must be zero or positive; got send [{string.Join(", ", sendRows)}], receive [{string.Join(", ", receiveRows)}]");
        if (input.dtype != output.dtype) throw new ArgumentException($"all-to-all output dtype {output.dtype} differs from input dtype {input.dtype}");
        long Rows(Tensor t) => t.dim() == 0 ? 1 : t.shape[0];
        long RowElements(Tensor t) => t.dim() <= 1 ? 1 : t.shape.Skip(1).Aggregate(1L, (a, b) => a * b);
        if (input.dim() > 1 && output.dim() > 1 && RowElements(input) != RowElements(output))
            throw new ArgumentException($"all-to-all rows differ: input rows hold {RowElements(input)} elements, output rows {RowElements(output)}");
        if (sendRows.Sum() != Rows(input)) throw new ArgumentException($"all-to-all sends {sendRows.Sum()} rows in all, but the input has {Rows(input)}");
        if (receiveRows.Sum() != Rows(output)) throw new ArgumentException($"all-to-all receives {receiveRows.Sum()} rows in all, but the output has {Rows(output)}");
        return (Math.Max(RowElements(input), RowElements(output)), (int)input.element_size());
    }
}
