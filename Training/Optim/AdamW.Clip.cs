// Global-norm clipping over the flat gradient buffers: the float64 squares of a chunk in two kernels, row sums on views.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Optim;

public sealed partial class AdamW
{
    /// <summary>
    /// The flat gradient buffers, one per device and dtype, after every parameter's <c>.grad</c> was made a view of them
    /// (a gradient assigned elsewhere since moves in first); null when some slot is a ZeRO shard or its parameter is not
    /// contiguous (that gradient lives outside any buffer). The exact gradient sum reads and writes them directly.
    /// </summary>
    public IReadOnlyList<Tensor>? AdoptGradients()
    {
        if (groups.Count == 0 || !groups.All(g => g.Adopted)) return null;
        using var noGrad = no_grad();
        AttachViews(weights: false);
        return [.. groups.Select(g => g.Grads!)];
    }

    /// <summary>
    /// <see cref="ClipGradNorm"/> over the flat buffers: each chunk of a group's gradients is converted to float64 and
    /// squared in place (two kernels, no temporaries per parameter), each member's rows are summed on a view of it, and
    /// the row sums are added on the host in slot and row order, as the per-slot path adds them. A row's sum is one
    /// reduction over the same float64 values either way (a chunk boundary falls between rows, never inside one), so the
    /// norm has the same bits.
    /// </summary>
    double ClipFlat(double maxNorm)
    {
        using var scope = NewDisposeScope();
        var index = new Dictionary<Slot, int>(ReferenceEqualityComparer.Instance);
        for (int i = 0; i < slots.Count; i++) index[slots[i]] = i;
        var sums = new List<Tensor>[slots.Count];
        foreach (var group in groups)
        {
            var device = group.Grads!.device;
            long chunk = FlatChunkElements ?? DefaultChunkElements(device);
            if (chunk < 1) throw new InvalidOperationException($"FlatChunkElements is {chunk}; expected at least 1 element");
            var runs = RowRuns(group, chunk);
            if (runs.Count == 0) continue;
            var buffer = Scratch(device, ScalarType.Float64, runs.Max(r => r.Count));
            foreach (var run in runs)
            {
                var squares = buffer.narrow(0, 0, run.Count).copy_(group.Grads.narrow(0, run.Start, run.Count)).pow_(2); // what square() is in TorchSharp, in place
                foreach (var (member, at, rows) in run.Pieces)
                {
                    var piece = squares.narrow(0, at - run.Start, rows * RowElements(member.Slot.Param)).view(rows, -1).sum(1);
                    (sums[index[member.Slot]] ??= []).Add(piece);
                }
            }
        }
        var ordered = sums.Where(s => s is not null).SelectMany(s => s).ToList();
        double sumSq = 0;
        if (ordered.Count > 0)
            foreach (var x in cat(ordered).cpu().data<double>()) sumSq += x;
        double norm = Math.Sqrt(sumSq);
        if (maxNorm > 0 && norm > maxNorm) ScaleGradients(maxNorm / (norm + 1e-6));
        return norm;
    }

    sealed record RowRun(long Start, long Count, List<(Member Member, long At, long Rows)> Pieces);

    /// <summary>
    /// The group's elements in runs of whole rows, each at most <paramref name="chunk"/> elements (or one row, if longer):
    /// a member's rows are split between runs when it does not fit, small members share a run.
    /// </summary>
    static List<RowRun> RowRuns(FlatGroup group, long chunk)
    {
        var runs = new List<RowRun>();
        RowRun? open = null;
        foreach (var m in group.Members)
        {
            if (m.Count == 0) continue; // no rows, or rows of no elements: squares that add nothing
            long rowElements = RowElements(m.Slot.Param), rows = m.Count / rowElements;
            for (long r = 0; r < rows;)
            {
                long take = Math.Min(rows - r, Math.Max(1, chunk / rowElements));
                long at = m.Offset + r * rowElements, n = take * rowElements;
                if (open is null || open.Count + n > chunk)
                {
                    if (open is not null) runs.Add(open);
                    open = new RowRun(at, 0, []);
                }
                open.Pieces.Add((m, at, take));
                open = open with { Count = open.Count + n };
                r += take;
            }
        }
        if (open is not null) runs.Add(open);
        return runs;
    }
}
