// ZeRO-3's gathers and gradient reduce-scatters in the order the layers run: the next layer's gather prefetched while
// this one computes, each layer's gradients reduce-scattered as soon as its backward is done.
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

public sealed partial class ZeroParameters
{
    /// <summary>
    /// Overlaps ZeRO-3's exchanges with the compute (call once, before the first step; every rank the same). With
    /// <paramref name="gradients"/> (a sum that keeps this rank's words alone: ZeRO-2's layout), each decoder layer's
    /// gradients are reduce-scattered into it as soon as the layer's backward is done and its <c>.grad</c>s freed, so a
    /// rank never holds more than the layers in flight of them; <see cref="ScatterRest"/> ends each micro-batch. On a CPU
    /// collective the gathers and scatters run on a thread of their own, in one fixed order (<see cref="OrderedExchange"/>),
    /// and each layer's gather starts while the layer before it (forward) or after it (backward) computes. A CUDA
    /// collective enqueues on the default stream, which orders everything anyway: its exchanges stay on the caller's
    /// thread, without prefetch. One partition only (under ep the forward's all-to-all shares the ranks' links).
    /// </summary>
    public void Overlap(ExactGradientSum? gradients) => Overlap(gradients, exchangeThread: null);

    /// <summary>
    /// <see cref="Overlap(ExactGradientSum?)"/> with the exchange thread chosen: null by the collective's device
    /// (<see cref="OrderedExchange.RunsOnThread"/>); false runs the CUDA shape (inline, no prefetch) on a CPU collective,
    /// a test seam (TrainingOptions.ExchangeThread).
    /// </summary>
    internal void Overlap(ExactGradientSum? gradients, bool? exchangeThread)
    {
        if (partitions.Length != 1) throw new InvalidOperationException($"ZeRO-3 overlaps its exchanges over one partition; these parameters are split over {partitions.Length}");
        if (exchange.Async || sink is not null) throw new InvalidOperationException("ZeRO-3's exchanges overlap already");
        var partition = partitions[0];
        exchange = new OrderedExchange(async: OrderedExchange.RunsOnThread(partition.Collective, exchangeThread));
        if (gradients is null) return;
        sink = gradients;
        scatters = new Dictionary<Group, LayerGradientScatter>(ReferenceEqualityComparer.Instance);
        foreach (var group in order.Append(rest))
            scatters[group] = new LayerGradientScatter(partition.Collective, partition.Shard,
                group.Parts.Length == 0 ? new ZeroShards(partition.Layout, []) : group.Parts[0].Shards, group.Members, gradients, bucketBytes);
    }

    /// <summary>Whether each layer's gradients are reduce-scattered during the backward (<see cref="Overlap"/> with a sum).</summary>
    public bool ScattersLayers => sink is not null;

    Task lastScatter = Task.CompletedTask;

    /// <summary>Gathers a prefetch served (the layer had its parameters on their way before it asked), since the start.</summary>
    public long PrefetchesUsed { get; private set; }
    /// <summary>Groups (layers, and the rest at the end of a backward) whose gradients were reduce-scattered during the backward, since the start.</summary>
    public long GroupsScattered { get; private set; }

    /// <summary>
    /// Ends a micro-batch's backward when <see cref="ScattersLayers"/>: waits for the layers' reduce-scatters, reduce-scatters
    /// the gradients outside the layers and counts the micro-batch in the sum. Every <c>.grad</c> is gone after it.
    /// </summary>
    public void ScatterRest()
    {
        var sum = sink ?? throw new InvalidOperationException("ScatterRest ends a backward whose layers were reduce-scattered (Overlap with a gradient sum)");
        exchange.Drain();
        Track();
        ScatterGroup(rest);
        exchange.Drain();
        foreach (var group in order)
            foreach (var i in group.Members)
                if (parameters[i].grad is { } left)
                {
                    left.Dispose();
                    throw new InvalidOperationException($"a parameter of {group.Name} has a gradient its layer's backward did not reduce-scatter");
                }
        sum.CountTerm();
    }

    /// <summary>
    /// Gives every parameter without a <c>.grad</c> an uninitialized one of its full shape, for the update after
    /// <see cref="MaterializeOwnRows"/>: the sum writes this rank's rows of it, the sharded update reads only those, and
    /// on the CPU the other rows' pages are never touched (as the parameters' own other rows).
    /// </summary>
    public void GiveGradients()
    {
        using var noGrad = no_grad();
        foreach (var p in parameters)
        {
            using var g = p.grad;
            if (g is null && p.numel() > 0) p.grad = empty_like(p).DetachFromDisposeScope();
        }
    }

    /// <summary>
    /// The largest parameter and gradient storage held at once since <see cref="ResetPeak"/>: this rank's rows, the
    /// gathered parameters (with a prefetched layer), every <c>.grad</c> and the gradients still being reduce-scattered,
    /// summed at each gather and at the end of each layer's backward (where the holdings peak). Counted only while
    /// <see cref="TrackPeak"/> is on (the count reads every parameter).
    /// </summary>
    public long PeakBytes => peak;
    public bool TrackPeak { get; set; }
    public void ResetPeak() => peak = 0;

    /// <summary>Counts the holdings now into <see cref="PeakBytes"/>: the trainer's end of a backward whose gradients wait for the step's reduce-scatter.</summary>
    public void NoteHoldings() => Track();

    void Track()
    {
        if (!TrackPeak) return;
        long bytes = ResidentBytes + Interlocked.Read(ref pendingGradientBytes);
        if (pending is { } p) bytes += p.Full.Sum(t => t.numel() * t.ElementSize);
        foreach (var parameter in parameters)
        {
            using var g = parameter.grad;
            if (g is not null) bytes += g.numel() * g.ElementSize;
        }
        peak = Math.Max(peak, bytes);
    }

    void Gather(Group group, bool backward)
    {
        using var noGrad = no_grad();
        Tensor[] full;
        if (pending is { } ready && ReferenceEquals(ready.Group, group))
        {
            pending = null;
            OrderedExchange.Wait(ready.Done);
            full = ready.Full;
            PrefetchesUsed++;
        }
        else
        {
            DropPending(); // a layer ran out of the predicted order (every rank alike): its prefetch was for nothing
            full = Fetch(group, out var done);
            OrderedExchange.Wait(done);
        }
        for (int k = 0; k < full.Length; k++)
        {
            parameters[group.Members[k]].set_(full[k]);
            full[k].Dispose();
        }
        if (exchange.Async && Next(group, backward) is { } next)
            pending = (next, Fetch(next, out var started), started);
        Track();
    }

    /// <summary>The layer that runs after <paramref name="group"/>: the next one in the forward, the one before in the backward, within the main layers or the MTP blocks.</summary>
    Group? Next(Group group, bool backward)
    {
        if (group.Index < 0) return null;
        int next = group.Index + (backward ? -1 : 1);
        bool main = group.Index < mainLayers;
        return next >= (main ? 0 : mainLayers) && next < (main ? mainLayers : order.Length) ? order[next] : null;
    }

    /// <summary>Fresh tensors of the group's members' full shapes with this rank's rows, and their all-gather, posted.</summary>
    Tensor[] Fetch(Group group, out Task done)
    {
        var full = new Tensor[group.Members.Length];
        for (int k = 0; k < full.Length; k++)
        {
            int i = group.Members[k];
            full[k] = empty(shapes[i], dtype: homes[i].dtype, device: homes[i].device).DetachFromDisposeScope();
            using var own = Own(full[k], i);
            own.copy_(homes[i]);
        }
        var parts = group.Parts.Select(part => (part.Partition, part.Shards, Tensors: part.Members.Select(i => full[Array.IndexOf(group.Members, i)]).ToArray())).ToArray();
        done = exchange.Post(() =>
        {
            foreach (var (partition, shards, tensors) in parts)
                ZeroStep.AllGatherRows(partitions[partition].Collective, shards, partitions[partition].Shard, tensors, bucketBytes);
        });
        return full;
    }

    void DropPending()
    {
        if (pending is not { } stale) return;
        pending = null;
        try { OrderedExchange.Wait(stale.Done); }
        finally { foreach (var t in stale.Full) t.Dispose(); }
    }

    /// <summary>Waits for every exchange in flight and drops an unused prefetch: before the caller uses the collective or the parameters otherwise.</summary>
    void Settle()
    {
        DropPending();
        exchange.Drain();
    }

    /// <summary>A layer's backward is done: its gradients go to the reduce-scatter, and it holds none after.</summary>
    void Differentiated(Group group)
    {
        if (sink is null) { Track(); return; }
        // The layer after's scatter, posted a layer's backward ago (ahead of the prefetch in the queue): at most one
        // layer's .grads are in flight, a bound the planner counts on (and the compute waits only on a slower ring).
        OrderedExchange.Wait(lastScatter);
        Track();
        lastScatter = ScatterGroup(group);
    }

    Task ScatterGroup(Group group)
    {
        var grads = new Tensor?[group.Members.Length];
        long bytes = 0;
        for (int k = 0; k < grads.Length; k++)
        {
            var p = parameters[group.Members[k]];
            var g = p.grad?.DetachFromDisposeScope();
            p.grad = null;
            grads[k] = g;
            bytes += g is null ? 0 : g.numel() * g.ElementSize;
        }
        Interlocked.Add(ref pendingGradientBytes, bytes);
        var scatter = scatters![group];
        GroupsScattered++;
        return exchange.Post(() =>
        {
            try { scatter.Add(grads); }
            finally
            {
                foreach (var g in grads) g?.Dispose();
                Interlocked.Add(ref pendingGradientBytes, -bytes);
            }
        });
    }
}
