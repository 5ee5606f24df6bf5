// AdamW with decoupled weight decay, fp32 master weights for low-precision parameters, and a named, saveable state.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Optim;

/// <summary>
/// PyTorch's AdamW update (Loshchilov and Hutter), written out so that its state has names: checkpoints store
/// <c>optimizer.{param}.exp_avg</c>, <c>.exp_avg_sq</c> (and <c>.master</c> for bf16 parameters) beside the weights,
/// and any layout can load them. Parameters of rank &lt; 2 (norms, biases) get no weight decay.
/// <para>
/// Sharded (ZeRO), each slot holds the moments (and master) of rows [<see cref="Slot.RowStart"/>, +<see cref="Slot.RowCount"/>)
/// of its parameter only and updates only those rows; the update is elementwise, so each element gets the same bits as
/// in the whole slot. The global gradient norm then needs every shard (ZeroStep), not <see cref="ClipGradNorm"/>.
/// </para>
/// <para>
/// The moments and master weights of all slots live in a few flat buffers per device and dtype (AdamW.Flat.cs); the
/// slots' tensors are views of them, and a whole parameter and its gradient become views too, so a step is a few large
/// kernels per chunk (2^24 elements on a GPU, 2^20 on a CPU) instead of a dozen per parameter, and clipping scales one buffer.
/// </para>
/// </summary>
public sealed partial class AdamW : IDisposable
{
    public sealed class Slot
    {
        public required string Name { get; init; }
        public required Tensor Param { get; init; }
        public required Tensor ExpAvg { get; init; }       // float32
        public required Tensor ExpAvgSq { get; init; }     // float32
        public Tensor? Master { get; init; }               // float32 copy when Param is bf16/fp16
        public required bool Decay { get; init; }
        /// <summary>The first row (dim 0) this slot updates; 0 when whole.</summary>
        public long RowStart { get; init; }
        /// <summary>The rows this slot updates (ZeRO shard), or null for the whole parameter.</summary>
        public long? RowCount { get; init; }

        /// <summary><paramref name="t"/> (the parameter or its gradient), narrowed to this slot's rows.</summary>
        public Tensor Own(Tensor t) => RowCount is { } n && t.dim() > 0 ? t.narrow(0, RowStart, n) : t.alias();
        /// <summary>Whether this slot updates nothing (a ZeRO shard without rows of this parameter).</summary>
        public bool Empty => RowCount == 0;
    }

    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.95;
    public double Eps { get; init; } = 1e-8;
    public double WeightDecay { get; init; } = 0.1;
    /// <summary>Optimizer steps taken (the t of bias correction).</summary>
    public long StepCount { get; set; }
    public IReadOnlyList<Slot> Slots => slots;
    readonly List<Slot> slots = new();

    /// <summary>Whether some slot holds only a shard of its parameter's rows.</summary>
    public bool Sharded => slots.Any(s => s.RowCount is not null);

    public AdamW(IEnumerable<(string name, Tensor param)> parameters) : this(parameters, null) { }

    /// <param name="shardRows">The rows (start, count) of the named parameter of the given shape this optimizer updates
    /// (its ZeRO shard, ParallelLayout.ZeroRowsOfRank: a routed expert's are split over fewer ranks); null: every row of
    /// every parameter.</param>
    public AdamW(IEnumerable<(string name, Tensor param)> parameters, Func<string, long[], (long Start, long Count)>? shardRows)
    {
        var seen = new HashSet<IntPtr>();
        var members = new List<(string Name, Tensor Param, long RowStart, long? RowCount)>();
        foreach (var (name, p) in parameters)
        {
            if (!seen.Add(p.Handle)) continue; // tied weights are one parameter
            var (rowStart, rowCount) = shardRows?.Invoke(name, p.shape) ?? (0, -1);
            members.Add((name, p, rowStart, rowCount < 0 ? null : rowCount));
        }
        using var noGrad = no_grad();
        slots.AddRange(LayOut(members)); // the state lives in flat buffers (AdamW.Flat.cs); each slot's tensors are views
    }

    /// <summary>Applies one update with learning rate <paramref name="lr"/> from the current gradients (missing ones count as zero).</summary>
    public void Step(double lr)
    {
        StepCount++;
        double c1 = 1 - Math.Pow(Beta1, StepCount), c2 = 1 - Math.Pow(Beta2, StepCount);
        using var noGrad = no_grad();
        if (Flat) { FlatStep(lr, c1, c2); return; }
        foreach (var s in slots)
        {
            if (s.Empty) continue;
            using var scope = NewDisposeScope();
            var param = s.Own(s.Param);
            var target = s.Master ?? param;
            var g = s.Param.grad is { } grad ? s.Own(grad).to_type(s.ExpAvg.dtype) : zeros_like(s.ExpAvg);
            if (s.Decay && WeightDecay != 0) target.mul_(1 - lr * WeightDecay);
            s.ExpAvg.mul_(Beta1).add_(g, alpha: 1 - Beta1);
            s.ExpAvgSq.mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
            var denom = (s.ExpAvgSq / c2).sqrt_().add_(Eps);
            target.addcdiv_(s.ExpAvg, denom, value: -lr / c1);
            if (s.Master is not null) param.copy_(s.Master);
        }
    }

    /// <summary>
    /// Global L2 norm of all gradients; scales them down to <paramref name="maxNorm"/> when above it (maxNorm &lt;= 0: no
    /// clipping). The squares are summed per row (dim 0), then the rows' sums in parameter and row order: the order a
    /// ZeRO shard's rows can be summed in too (ZeroStep.ClipGradNorm), so the norm is the same bits sharded or not.
    /// With <see cref="Flat"/> the row sums come from the flat gradient buffers a chunk at a time (AdamW.Clip.cs).
    /// </summary>
    public double ClipGradNorm(double maxNorm)
    {
        if (Sharded) throw new InvalidOperationException("a sharded AdamW sees only its rows' gradients: the global norm is ZeroStep's");
        using var noGrad = no_grad();
        AttachViews(weights: false); // a gradient written outside the flat buffer since the last step joins it before it is read
        if (Flat && groups.All(g => g.Adopted)) return ClipFlat(maxNorm);
        double sumSq = 0;
        foreach (var s in slots)
            if (s.Param.grad is { } g)
            {
                using var scope = NewDisposeScope();
                foreach (var x in RowSquares(g).data<double>()) sumSq += x;
            }
        double norm = Math.Sqrt(sumSq);
        if (maxNorm > 0 && norm > maxNorm) ScaleGradients(maxNorm / (norm + 1e-6));
        return norm;
    }

    /// <summary>The sum of squares of each row (dim 0) of <paramref name="grad"/> in float64 (a scalar is one row).</summary>
    public static Tensor RowSquares(Tensor grad)
    {
        long rows = grad.dim() == 0 ? 1 : grad.shape[0];
        return grad.to_type(ScalarType.Float64).reshape(rows, -1).square().sum(1).cpu();
    }

    /// <summary>Named optimizer tensors for a checkpoint (aliases, not copies).</summary>
    public IEnumerable<KeyValuePair<string, Tensor>> StateTensors(Func<string, string>? rename = null)
    {
        foreach (var s in slots)
        {
            var name = rename?.Invoke(s.Name) ?? s.Name;
            yield return new($"optimizer.{name}.exp_avg", s.ExpAvg);
            yield return new($"optimizer.{name}.exp_avg_sq", s.ExpAvgSq);
            if (s.Master is not null) yield return new($"optimizer.{name}.master", s.Master);
        }
    }

    /// <summary>The rows each state tensor of a sharded slot holds, by checkpoint name (what a load needs to read).</summary>
    public IReadOnlyDictionary<string, (long Start, long Count)> ShardRows()
    {
        var result = new Dictionary<string, (long, long)>(StringComparer.Ordinal);
        foreach (var s in slots)
            if (s.RowCount is { } n && s.Param.dim() > 0)
                foreach (var kind in s.Master is null ? new[] { "exp_avg", "exp_avg_sq" } : ["exp_avg", "exp_avg_sq", "master"])
                    result[$"optimizer.{s.Name}.{kind}"] = (s.RowStart, n);
        return result;
    }

    /// <summary>
    /// Restores moments (and master weights) from checkpoint tensors; every slot must be present. A sharded slot takes
    /// either its own rows or the whole tensor (and keeps its rows of it).
    /// </summary>
    public void LoadStateTensors(IReadOnlyDictionary<string, Tensor> tensors, string source, Func<string, string>? rename = null)
    {
        using var noGrad = no_grad();
        foreach (var s in slots)
        {
            var name = rename?.Invoke(s.Name) ?? s.Name;
            Copy(tensors, $"optimizer.{name}.exp_avg", s, s.ExpAvg, source);
            Copy(tensors, $"optimizer.{name}.exp_avg_sq", s, s.ExpAvgSq, source);
            if (s.Master is not null)
            {
                if (tensors.ContainsKey($"optimizer.{name}.master")) Copy(tensors, $"optimizer.{name}.master", s, s.Master, source);
                else { using var own = s.Own(s.Param); s.Master.copy_(own.to_type(ScalarType.Float32)); }
            }
        }
    }

    /// <summary>Copies the state <paramref name="key"/> into <paramref name="target"/>: given whole, a sharded slot takes its rows.</summary>
    static void Copy(IReadOnlyDictionary<string, Tensor> tensors, string key, Slot slot, Tensor target, string source)
    {
        if (!tensors.TryGetValue(key, out var value))
            throw new InvalidDataException($"{source}: optimizer state '{key}' is missing");
        if (slot.RowCount is not null && !value.shape.SequenceEqual(target.shape) && value.shape.SequenceEqual(slot.Param.shape))
        {
            using var rows = slot.Own(value);
            target.copy_(rows);
            return;
        }
        if (!value.shape.SequenceEqual(target.shape))
            throw new InvalidDataException($"{source}: optimizer state '{key}' has shape [{string.Join(", ", value.shape)}], expected [{string.Join(", ", target.shape)}]");
        target.copy_(value);
    }

    public void Dispose()
    {
        foreach (var s in slots) { s.ExpAvg.Dispose(); s.ExpAvgSq.Dispose(); s.Master?.Dispose(); }
        slots.Clear();
        foreach (var g in groups) g.Dispose();
        groups.Clear();
        foreach (var b in scratch.Values) b.Dispose();
        scratch.Clear();
    }
}
