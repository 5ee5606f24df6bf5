// AdamW's state in a few flat buffers per device and dtype, so a step is a handful of large elementwise kernels.
using DeepSeekCluster.Training.Collectives;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Optim;

public sealed partial class AdamW
{
    /// <summary>
    /// Whether <see cref="Step"/> runs over the flat buffers, a few kernels per <see cref="FlatChunkElements"/> (the
    /// default), or slot by slot, a dozen small kernels per parameter (the reference the flat step is tested and
    /// benchmarked against). Both read and write the same state: the slots' tensors are views of the flat buffers.
    /// </summary>
    public bool Flat { get; set; } = true;

    /// <summary>
    /// Elements one flat kernel covers; null: <see cref="DefaultChunkElements"/> of the buffers' device. Bounds the
    /// step's temporaries (the gradient in the state's dtype and the denominator) whatever the model's size.
    /// </summary>
    public long? FlatChunkElements { get; set; }

    /// <summary>
    /// On a GPU 2^24 elements (64 MiB of fp32 temporaries): kernels large enough to fill it. On a CPU 2^20: the dozen
    /// passes over a chunk then reuse the cache. Measured side by side on the 2-core VM at load 2 (bench kernels):
    /// chunks of 2^18–2^20 took 0.91–0.95× the per-slot step's time, 2^16 1.2× (call overhead), 2^24 1.5× (every pass
    /// streams from memory); under load 22–36 the order was different and noisy (2^24 fastest).
    /// </summary>
    public static long DefaultChunkElements(Device device) => device.type == TorchSharp.DeviceType.CPU ? 1L << 20 : 1L << 24;

    readonly List<FlatGroup> groups = new();
    // Two chunks of the state's dtype per device, kept across steps: fresh 64 MiB temporaries each chunk are fresh pages
    // for the allocator every time (on the CPU, page faults that cost more than the arithmetic).
    readonly Dictionary<(string Device, ScalarType Dtype), Tensor> scratch = new();

    Tensor Scratch(Device device, ScalarType dtype, long chunk)
    {
        var key = (device.ToString(), dtype);
        if (!scratch.TryGetValue(key, out var buffer) || buffer.numel() < 2 * chunk)
        {
            buffer?.Dispose();
            scratch[key] = buffer = empty(2 * chunk, dtype: dtype, device: device).DetachFromDisposeScope();
        }
        return buffer;
    }

    /// <summary>
    /// The parameters of one device and dtype, whole or as ZeRO shards, laid out back to back (weight-decayed ones first,
    /// so the decay is one kernel over a prefix). Whole parameters are <see cref="Adopted"/>: the parameter and its
    /// <c>.grad</c> become views of <see cref="Weights"/> and <see cref="Grads"/>, so the step reads and writes them
    /// with no copy. A shard's rows are gathered into a chunk-sized scratch and written back (its parameter keeps every
    /// row, which the flat buffer cannot be a view of).
    /// </summary>
    sealed class FlatGroup : IDisposable
    {
        public required bool Adopted { get; init; }
        public required Tensor ExpAvg { get; init; }
        public required Tensor ExpAvgSq { get; init; }
        public Tensor? Master { get; init; }
        public Tensor? Weights { get; init; }   // adopted: the parameters' storage (their dtype)
        public Tensor? Grads { get; init; }     // adopted: the gradients' storage (the parameters' dtype)
        public required long Count { get; init; }
        public required long DecayEnd { get; init; }
        public required List<Member> Members { get; init; }

        public void Dispose()
        {
            ExpAvg.Dispose(); ExpAvgSq.Dispose(); Master?.Dispose(); Weights?.Dispose(); Grads?.Dispose();
            foreach (var m in Members) { m.WeightView?.Dispose(); m.GradView?.Dispose(); }
        }
    }

    /// <summary>A slot's place in its group: elements [Offset, +Count) of every flat buffer.</summary>
    sealed class Member
    {
        public required Slot Slot { get; init; }
        public required long Offset { get; init; }
        public required long Count { get; init; }
        public Tensor? WeightView, GradView;       // adopted: the views the parameter and its .grad are
        public IntPtr WeightData, GradData;        // their data pointers: a parameter or gradient moved elsewhere is re-attached
    }

    /// <summary>Allocates the groups' buffers and returns one slot per member, in the given order, its state as views.</summary>
    List<Slot> LayOut(List<(string Name, Tensor Param, long RowStart, long? RowCount)> members)
    {
        var result = new Slot?[members.Count];
        var keys = members.Select((m, i) => (i, key: (Device: m.Param.device.ToString(), m.Param.dtype, Adopted: m.RowCount is null && m.Param.is_contiguous())));
        foreach (var group in keys.GroupBy(x => x.key, x => x.i))
        {
            var (_, dtype, adopted) = group.Key;
            var order = group.OrderBy(i => members[i].Param.dim() >= 2 ? 0 : 1).ToList(); // stable: decayed first
            var owned = order.Select(i => members[i].RowCount is { } n && members[i].Param.dim() > 0 ? n * RowElements(members[i].Param) : members[i].Param.numel()).ToList();
            long total = owned.Sum(), decayEnd = order.Select((i, k) => members[i].Param.dim() >= 2 ? owned[k] : 0).Sum();
            var device = members[order[0]].Param.device;
            bool low = dtype is ScalarType.BFloat16 or ScalarType.Float16;
            var stateType = dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            var flat = new FlatGroup
            {
                Adopted = adopted, Count = total, DecayEnd = decayEnd, Members = new(),
                ExpAvg = zeros(total, dtype: stateType, device: device).DetachFromDisposeScope(),
                ExpAvgSq = zeros(total, dtype: stateType, device: device).DetachFromDisposeScope(),
                Master = low ? empty(total, dtype: ScalarType.Float32, device: device).DetachFromDisposeScope() : null,
                Weights = adopted ? empty(total, dtype: dtype, device: device).DetachFromDisposeScope() : null,
                Grads = adopted ? zeros(total, dtype: dtype, device: device).DetachFromDisposeScope() : null,
            };
            long at = 0;
            for (int k = 0; k < order.Count; k++)
            {
                var (name, p, rowStart, rowCount) = members[order[k]];
                long n = owned[k];
                using var own = rowCount is { } rows && p.dim() > 0 ? p.narrow(0, rowStart, rows) : p.alias();
                Tensor View(Tensor buffer) => buffer.narrow(0, at, n).view(own.shape).DetachFromDisposeScope();
                var slot = new Slot
                {
                    Name = name, Param = p, Decay = p.dim() >= 2, RowStart = rowStart, RowCount = rowCount,
                    ExpAvg = View(flat.ExpAvg), ExpAvgSq = View(flat.ExpAvgSq), Master = flat.Master is { } m ? View(m) : null,
                };
                slot.Master?.copy_(own);
                var member = new Member { Slot = slot, Offset = at, Count = n };
                if (adopted) { member.WeightView = View(flat.Weights!); member.GradView = View(flat.Grads!); }
                flat.Members.Add(member);
                result[order[k]] = slot;
                at += n;
            }
            groups.Add(flat);
        }
        // The parameters become views at the first step (AttachViews), not here: an optimizer made only to name the
        // state (PipelineStage's catalog) must leave the model's storage alone, or a stage could not free the others' parameters.
        return [.. result.Select(s => s!)];
    }

    static long RowElements(Tensor p) => p.dim() == 0 ? 1 : p.numel() / Math.Max(1, p.shape[0]);

    /// <summary>
    /// Makes every whole parameter's gradient a view of its group's flat gradient buffer, and with
    /// <paramref name="weights"/> the parameter itself a view of the flat weight buffer: at the first step, and again for
    /// one that something replaced since (a load that swapped the storage, a gradient assigned rather than accumulated:
    /// autograd accumulates into an existing <c>.grad</c> in place). Its values move into the buffer first.
    /// <para>
    /// Only the update (<see cref="FlatStep"/>) moves the weights: swapping a parameter's storage is a change to a tensor
    /// the checkpoint saves, and a background checkpoint copy may read the parameters until the trainer's
    /// <c>BeforeStateChange</c> hook (AsyncCheckpointSaver.BeginSave); a swap beside that copy frees the storage it
    /// reads. The gradients are no checkpoint tensor, so the step's start (<see cref="AdoptGradients"/>) and the clip move those.
    /// </para>
    /// </summary>
    void AttachViews(bool weights)
    {
        using var noGrad = no_grad();
        foreach (var group in groups)
        {
            if (!group.Adopted) continue;
            foreach (var m in group.Members)
            {
                var p = m.Slot.Param;
                if (weights && TensorMemory.DataPointer(p) != m.WeightData)
                {
                    if (p.numel() != m.Count)
                        throw new InvalidOperationException($"parameter '{m.Slot.Name}' now has {p.numel()} elements; the optimizer was made for {m.Count}");
                    m.WeightView!.copy_(p);
                    p.set_(m.WeightView!); // returns p itself: not disposed
                    m.WeightData = TensorMemory.DataPointer(p);
                }
                using var grad = p.grad;
                if (grad is null || TensorMemory.DataPointer(grad) != m.GradData)
                {
                    if (grad is null) m.GradView!.zero_();
                    else m.GradView!.copy_(grad);
                    p.grad = m.GradView;
                    m.GradData = TensorMemory.DataPointer(m.GradView!);
                }
            }
        }
    }

    /// <summary>Multiplies every gradient by <paramref name="scale"/>: one kernel per adopted group.</summary>
    void ScaleGradients(double scale)
    {
        foreach (var group in groups)
            if (group.Adopted) group.Grads!.mul_(scale);
            else foreach (var m in group.Members) m.Slot.Param.grad?.mul_(scale);
    }

    /// <summary>
    /// The update of <see cref="Step"/> over each group's flat buffers, a chunk at a time: the same kernels in the same
    /// order on every element as the per-slot step, so the same bits (elementwise, an element's result does not depend
    /// on the tensor it sits in).
    /// </summary>
    void FlatStep(double lr, double c1, double c2)
    {
        AttachViews(weights: true);
        foreach (var group in groups)
        {
            long chunk = FlatChunkElements ?? DefaultChunkElements(group.ExpAvg.device);
            if (chunk < 1) throw new InvalidOperationException($"FlatChunkElements is {chunk}; expected at least 1 element");
            for (long c = 0; c < group.Count; c += chunk)
            {
                using var scope = NewDisposeScope();
                long k = Math.Min(chunk, group.Count - c);
                var m = group.ExpAvg.narrow(0, c, k);
                var v = group.ExpAvgSq.narrow(0, c, k);
                var buffer = Scratch(m.device, m.dtype, chunk);
                Tensor g, weights;
                if (group.Adopted)
                {
                    var grads = group.Grads!.narrow(0, c, k);
                    g = grads.dtype == m.dtype ? grads : buffer.narrow(0, chunk, k).copy_(grads); // the conversion to_type makes
                    weights = group.Weights!.narrow(0, c, k);
                }
                else
                {
                    g = Gather(group, c, k, m.dtype, s => s.Param.grad);
                    weights = group.Master is null ? Gather(group, c, k, m.dtype, s => s.Param) : null!;
                }
                var target = group.Master?.narrow(0, c, k) ?? weights;
                long decayed = Math.Clamp(group.DecayEnd - c, 0, k);
                if (decayed > 0 && WeightDecay != 0) target.narrow(0, 0, decayed).mul_(1 - lr * WeightDecay);
                m.mul_(Beta1).add_(g, alpha: 1 - Beta1);
                v.mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
                var denom = buffer.narrow(0, 0, k).copy_(v).div_(c2).sqrt_().add_(Eps); // v / c2's bits, in place
                target.addcdiv_(m, denom, value: -lr / c1);
                if (group.Adopted) { if (group.Master is not null) weights.copy_(target); }
                else Scatter(group, c, k, target);
            }
        }
    }

    /// <summary>Elements [c, +k) of a non-adopted group, gathered from each member's own rows of <paramref name="of"/> (null: zeros).</summary>
    static Tensor Gather(FlatGroup group, long c, long k, ScalarType dtype, Func<Slot, Tensor?> of)
    {
        var chunk = empty(k, dtype: dtype, device: group.ExpAvg.device);
        foreach (var (member, from, length, at) in Pieces(group, c, k))
        {
            var piece = chunk.narrow(0, at, length);
            if (of(member.Slot) is { } source) piece.copy_(member.Slot.Own(source).reshape(-1).narrow(0, from, length));
            else piece.zero_();
        }
        return chunk;
    }

    /// <summary>Writes elements [c, +k) of <paramref name="values"/> back into each member's own rows of its parameter.</summary>
    static void Scatter(FlatGroup group, long c, long k, Tensor values)
    {
        foreach (var (member, from, length, at) in Pieces(group, c, k))
        {
            using var own = member.Slot.Own(member.Slot.Param);
            own.view(-1).narrow(0, from, length).copy_(values.narrow(0, at, length));
        }
    }

    /// <summary>The members overlapping elements [c, +k): each one's first element in it, the length, and where it sits in the chunk.</summary>
    static IEnumerable<(Member Member, long From, long Length, long At)> Pieces(FlatGroup group, long c, long k)
    {
        foreach (var m in group.Members)
        {
            long start = Math.Max(c, m.Offset), end = Math.Min(c + k, m.Offset + m.Count);
            if (end > start) yield return (m, start - m.Offset, end - start, start - c);
        }
    }
}
