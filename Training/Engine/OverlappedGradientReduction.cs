// Plain data parallelism's gradient all-reduce overlapped with the last micro-batch's backward: each bucket of exact-sum
// words is converted and all-reduced as soon as its layers' backward is done. Not ZeRO's (Parallel/ZeroParameters.Overlap.cs).
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// The data-parallel reduction of <see cref="BucketedGradientReducer"/> (zero 0, pp 1, ep 1), started during the backward.
/// Earlier micro-batches only add their words into the sum locally, so only the last micro-batch's backward can overlap:
/// <see cref="Arm"/> before its forward makes every decoder layer (main and MTP blocks) signal the end of its backward
/// (<see cref="DecoderLayer.BackwardDone"/>), and the main model the end of the backward of everything after its layers
/// (<see cref="DeepSeekModel.HeadBackwardDone"/>: final norm, head, the MTP modules' own norms and projection; the first
/// signal of the backward). At each signal the group's gradients are converted to exact-sum words and added into the sum
/// (<see cref="ExactGradientSum.ToWords"/>, as ZeRO-3's per-layer scatter does), and once the groups ready since the last
/// bucket hold <see cref="BucketedGradientReducer.BucketBytes"/> of words, their words are all-reduced in place.
/// <see cref="EndBackward"/> adds the embedding (used at both ends of the graph: complete only when the backward ends) and
/// the last bucket; <see cref="Complete"/> waits for every bucket and all-reduces the largest magnitude. On a CPU
/// collective the conversions and all-reduces run on one thread of their own, in the order posted, which is the same on
/// every rank (<see cref="OrderedExchange"/>). On NCCL the conversions are kernels on the
/// default stream, enqueued by the backward's own thread, and each bucket's all-reduce goes on the collective's side
/// stream after an event recorded on the default stream behind them (<see cref="NcclCollective.AllReduceAfterCompute"/>):
/// NCCL reads the words only once the kernels that wrote them are done, and runs beside the rest of the backward;
/// <see cref="Complete"/> waits for the side stream before anything reads the words again. Everything but that launch is
/// the same code on both.
/// <para>
/// Bits: the words are integers, each element's conversion is the same elementwise arithmetic as the sum's own, and an
/// integer all-reduce is exact in any grouping, so the sum, the mean and everything after are the bits of the
/// reduction after the backward (tests/Training.Tests/Collectives/OverlappedReductionTests.cs).
/// </para>
/// </summary>
public sealed class OverlappedGradientReduction : IDisposable
{
    // A run of words [Word, +Count) whose gradient elements are one region of a flat buffer (Buffer, at Element), or, when
    // Buffer is null (the per-parameter sum, or a .grad that is not its buffer's view), those of Members' .grads in turn.
    sealed record Run(long Word, long Count, Tensor? Buffer, long Element, (Tensor Param, IntPtr Data)[] Members);

    // A decoder layer's parameters (or those outside the layers), as runs of contiguous words.
    sealed record Group(string Name, Run[] Runs)
    {
        public long Words => Runs.Sum(r => r.Count);
    }

    readonly ICollective collective;
    readonly ExactGradientSum sum;
    readonly long bucketBytes;
    readonly (DecoderLayer Layer, Group Group)[] layers; // in the model's order: main layers, then MTP blocks
    readonly DeepSeekModel main;
    readonly Group head; // used only after the layers: final norm, lm_head, the MTP modules' enorm, hnorm, eh_proj and norm
    readonly Group rest; // the embedding (and anything else outside the layers)
    readonly long chunk;
    OrderedExchange? exchange;
    bool armed; // between Arm and EndBackward
    Exception? failure; // the first thing a signal threw (kept for EndBackward: nothing may leave the autograd engine's callback)
    List<Run> bucket = [];
    long bucketWords;
    HashSet<Group> posted = new(ReferenceEqualityComparer.Instance);
    Tensor? scratch;

    /// <summary>Null: the exchange thread by the collective's device (<see cref="OrderedExchange.RunsOnThread"/>); false runs the CUDA shape (conversions and all-reduces on the backward's thread) on a CPU collective, a test seam (TrainingOptions.ExchangeThread).</summary>
    internal bool? ExchangeThread { get; init; }

    /// <summary>Whether the last armed step's conversions and all-reduces ran on an exchange thread (false: on the backward's own, as on CUDA).</summary>
    internal bool ExchangedOnThread { get; private set; }

    /// <summary>Buckets all-reduced during a backward (before <see cref="EndBackward"/>), since the start.</summary>
    public long BucketsDuringBackward { get; private set; }
    /// <summary>Buckets all-reduced in all, since the start.</summary>
    public long Buckets { get; private set; }

    /// <param name="sum">The trainer's exact sum without ZeRO shards: over <paramref name="optimizer"/>'s flat gradient buffers, or per parameter in slot order.</param>
    public OverlappedGradientReduction(DeepSeekForCausalLM model, AdamW optimizer, ExactGradientSum sum, ICollective collective, long bucketBytes)
    {
        if (sum.Shards is not null) throw new ArgumentException("the overlapped all-reduce sums whole words (zero 0); ZeRO's are reduce-scattered", nameof(sum));
        this.collective = collective;
        this.sum = sum;
        this.bucketBytes = bucketBytes;
        chunk = ExactGradientSum.DefaultFlatChunk(collective.Device);
        var slots = optimizer.Slots.Select(s => s.Param).ToList();
        var words = WordsOf(slots, sum.OverFlat ? optimizer.AdoptGradients() : null);
        var index = new Dictionary<IntPtr, int>();
        for (int i = 0; i < slots.Count; i++) index[slots[i].Handle] = i;
        var inLayer = new bool[slots.Count];
        main = model.model;
        var decoderLayers = model.model.layers.Concat(model.mtp.Select(m => m.block)).ToList();
        layers = new (DecoderLayer, Group)[decoderLayers.Count];
        for (int l = 0; l < decoderLayers.Count; l++)
        {
            var members = decoderLayers[l].parameters().Select(p => index.TryGetValue(p.Handle, out int i) ? i
                : throw new ArgumentException($"a parameter of decoder layer {l} is not among the optimizer's {slots.Count}")).Distinct().ToArray();
            foreach (var m in members) inLayer[m] = true;
            layers[l] = (decoderLayers[l], new Group($"layer {l}", RunsOf(members, words)));
        }
        // Everything after the layers; not the embedding, which the MTP modules use after them but the model before
        // them (with tied embeddings the head is the embedding, and stays with it).
        var embedding = model.model.embed_tokens.weight!.Handle;
        var after = model.model.norm.parameters().Concat(model.lm_head.parameters())
            .Concat(model.mtp.SelectMany(m => m.parameters().Except(m.block.parameters(), HandleComparer.Instance)))
            .Select(p => p.Handle).Where(h => h != embedding).ToHashSet();
        var outside = Enumerable.Range(0, slots.Count).Where(i => !inLayer[i]).ToList();
        head = new Group("after the layers", RunsOf([.. outside.Where(i => after.Contains(slots[i].Handle))], words));
        rest = new Group("the embedding", RunsOf([.. outside.Where(i => !after.Contains(slots[i].Handle))], words));
    }

    sealed class HandleComparer : IEqualityComparer<TorchSharp.Modules.Parameter>
    {
        public static readonly HandleComparer Instance = new();
        public bool Equals(TorchSharp.Modules.Parameter? x, TorchSharp.Modules.Parameter? y) => x?.Handle == y?.Handle;
        public int GetHashCode(TorchSharp.Modules.Parameter p) => p.Handle.GetHashCode();
    }

    /// <summary>Where each slot's words are: its buffer and element there (flat), or in slot order (per parameter).</summary>
    static (Tensor Param, long Word, Tensor? Buffer, long Element, IntPtr Data)[] WordsOf(List<Tensor> slots, IReadOnlyList<Tensor>? buffers)
    {
        var result = new (Tensor, long, Tensor?, long, IntPtr)[slots.Count];
        long at = 0;
        if (buffers is null)
        {
            for (int i = 0; i < slots.Count; i++) { result[i] = (slots[i], at, null, 0, IntPtr.Zero); at += slots[i].numel(); }
            return result;
        }
        var starts = new long[buffers.Count];
        for (int b = 0; b < buffers.Count; b++) { starts[b] = at; at += buffers[b].numel(); }
        for (int i = 0; i < slots.Count; i++)
        {
            using var g = slots[i].grad ?? throw new InvalidOperationException($"parameter {i} has no .grad view after AdoptGradients");
            var data = TensorMemory.DataPointer(g);
            int b = Enumerable.Range(0, buffers.Count).FirstOrDefault(k => Inside(buffers[k], data), -1);
            if (b < 0) throw new InvalidOperationException($"parameter {i}'s .grad is no view of a flat gradient buffer");
            long element = (data - TensorMemory.DataPointer(buffers[b])) / buffers[b].element_size();
            result[i] = (slots[i], starts[b] + element, buffers[b], element, data);
        }
        return result;

        static bool Inside(Tensor buffer, IntPtr data)
        {
            var start = TensorMemory.DataPointer(buffer);
            return data >= start && data < start + (nint)(buffer.numel() * buffer.element_size());
        }
    }

    /// <summary>The members' words merged into runs where both the words and the buffer elements follow on.</summary>
    static Run[] RunsOf(int[] members, (Tensor Param, long Word, Tensor? Buffer, long Element, IntPtr Data)[] words)
    {
        var runs = new List<Run>();
        foreach (var i in members.Where(m => words[m].Param.numel() > 0).OrderBy(m => words[m].Word))
        {
            var (p, word, buffer, element, data) = words[i];
            if (runs.Count > 0 && runs[^1] is var last && last.Word + last.Count == word
                && (buffer is null ? last.Buffer is null : ReferenceEquals(last.Buffer, buffer) && last.Element + last.Count == element))
                runs[^1] = last with { Count = last.Count + p.numel(), Members = [.. last.Members, (p, data)] };
            else runs.Add(new Run(word, p.numel(), buffer, element, [(p, data)]));
        }
        return [.. runs];
    }

    /// <summary>
    /// Before the last micro-batch's forward (its gradients accumulate into zeros): every layer and the head will signal
    /// the end of their backward. Every rank arms the same step. Dispose what it returns at the end of the micro-batch:
    /// a forward or backward that threw before <see cref="EndBackward"/> leaves no signal and no exchange thread behind.
    /// </summary>
    public ArmedStep Arm()
    {
        Abandon(); // a step that threw between EndBackward and Complete left its exchange running
        exchange = new OrderedExchange(async: OrderedExchange.RunsOnThread(collective, ExchangeThread), name: "dp-grad-reduce");
        ExchangedOnThread = exchange.Async;
        posted = new(ReferenceEqualityComparer.Instance);
        bucket = [];
        bucketWords = 0;
        failure = null;
        armed = true;
        foreach (var (layer, group) in layers) layer.BackwardDone = new Signal(this, group);
        main.HeadBackwardDone = new Signal(this, head);
        return new ArmedStep(this);
    }

    /// <summary>The armed micro-batch: disposed before <see cref="EndBackward"/> (its forward or backward threw), it abandons the step's reduction.</summary>
    public readonly struct ArmedStep(OverlappedGradientReduction? owner) : IDisposable
    {
        public void Dispose()
        {
            if (owner is { armed: true }) owner.Abandon();
        }
    }

    /// <summary>
    /// After the last micro-batch's backward: the groups that did not signal (in the model's order), the embedding, and
    /// the last bucket. Throws what a signal threw during the backward.
    /// </summary>
    public void EndBackward()
    {
        var ex = exchange ?? throw new InvalidOperationException("EndBackward without Arm");
        Disarm();
        if (failure is { } e)
        {
            Abandon();
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(e);
        }
        foreach (var (_, group) in layers) Ready(group, duringBackward: false);
        Ready(head, duringBackward: false);
        Ready(rest, duringBackward: false);
        if (bucket.Count > 0) PostBucket(duringBackward: false);
        ex.Post(sum.CountTerm);
    }

    /// <summary>A group's signal: called back from inside the autograd engine, so it never throws (IBackwardListener).</summary>
    sealed class Signal(OverlappedGradientReduction owner, Group group) : IBackwardListener
    {
        public void Done()
        {
            if (owner.failure is null) owner.Ready(group, duringBackward: true);
        }

        public void Failed(Exception error) => Interlocked.CompareExchange(ref owner.failure, error, null);
    }

    /// <summary>Waits for every bucket and all-reduces the largest magnitude (Max): the sum is then the reducer's. Ends the exchange thread, also on a failure (thrown here).</summary>
    public void Complete()
    {
        var ex = exchange ?? throw new InvalidOperationException("Complete without Arm");
        try
        {
            ex.Drain();
            (collective as NcclCollective)?.WaitForSideStream();
            collective.AllReduce(sum.Worst, ReduceOp.Max);
        }
        finally { Abandon(); }
    }

    /// <summary>
    /// Drops the signals and ends the exchange thread (the calls queued run out first: a failed collective fails them
    /// quickly); on NCCL waits for the all-reduces still on the side stream, which read and write the words (the next
    /// step's Clear, or the sum's Dispose, must not run under them). Throws nothing: it runs after the failure that is thrown.
    /// </summary>
    public void Abandon()
    {
        Disarm();
        var ex = exchange;
        exchange = null;
        if (ex is null) return;
        // The queued conversions run on their own thread, maybe after the step's hold closed (Trainer.Dispose): hold the
        // finalizers while they run, as the step does (FinalizerHold: TorchSharp's implicit Scalars).
        using var hold = FinalizerHold.Enter();
        ex.Dispose();
        if (collective is NcclCollective nccl)
            try { nccl.WaitForSideStream(); }
            catch (Exception) { } // the wait failed: the communicator was aborted (NcclCollective.Fail), nothing runs on the side stream any more
    }

    public void Dispose()
    {
        Abandon();
        scratch?.Dispose();
        scratch = null;
    }

    void Disarm()
    {
        armed = false;
        foreach (var (layer, _) in layers) layer.BackwardDone = null;
        main.HeadBackwardDone = null;
    }

    void Ready(Group group, bool duringBackward)
    {
        var ex = exchange ?? throw new InvalidOperationException($"the group {group.Name} signalled with no step armed");
        if (!posted.Add(group)) return;
        ex.Post(() => Add(group));
        bucket.AddRange(group.Runs);
        bucketWords += group.Words;
        if (bucketWords * 2 * sizeof(long) >= bucketBytes) PostBucket(duringBackward);
    }

    void PostBucket(bool duringBackward)
    {
        var runs = Merge(bucket);
        bucket = [];
        bucketWords = 0;
        Buckets++;
        if (duringBackward) BucketsDuringBackward++;
        exchange!.Post(() =>
        {
            foreach (var (word, count) in runs)
                foreach (var words in new[] { sum.High, sum.Low })
                {
                    using var view = words.narrow(0, word, count);
                    if (collective is NcclCollective nccl) nccl.AllReduceAfterCompute(view, ReduceOp.Sum); // (the exchange is synchronous there)
                    else collective.AllReduce(view, ReduceOp.Sum);
                }
        });
    }

    /// <summary>The bucket's runs as maximal ranges of words (consecutive layers' runs follow on in the flat buffers).</summary>
    static List<(long Word, long Count)> Merge(List<Run> runs)
    {
        var merged = new List<(long Word, long Count)>();
        foreach (var r in runs.OrderBy(r => r.Word))
            if (merged.Count > 0 && merged[^1].Word + merged[^1].Count == r.Word) merged[^1] = (merged[^1].Word, merged[^1].Count + r.Count);
            else merged.Add((r.Word, r.Count));
        return merged;
    }

    /// <summary>Adds the group's gradients (the last micro-batch's, complete) to the sum's words; on the exchange thread.</summary>
    void Add(Group group)
    {
        foreach (var run in group.Runs)
        {
            if (run.Buffer is { } buffer && run.Members.All(m => IsView(m.Param, m.Data)))
            {
                using var region = buffer.narrow(0, run.Element, run.Count);
                AddWords(region, run.Word);
                continue;
            }
            long word = run.Word;
            foreach (var (p, _) in run.Members)
            {
                using var g = p.grad;
                if (g is not null)
                {
                    using var flat = g.reshape(-1);
                    AddWords(flat, word);
                }
                word += p.numel();
            }
        }
    }

    static bool IsView(Tensor p, IntPtr data)
    {
        using var g = p.grad;
        return g is not null && TensorMemory.DataPointer(g) == data;
    }

    /// <summary>The words of <paramref name="x"/>'s elements (flat), added at <paramref name="word"/>, a chunk at a time.</summary>
    void AddWords(Tensor x, long word)
    {
        long n = x.numel();
        scratch ??= empty(Math.Min(chunk, Math.Max(1, layers.Select(l => l.Group).Append(head).Append(rest).SelectMany(g => g.Runs).Max(r => r.Count))),
                          dtype: ScalarType.Float64, device: sum.High.device).DetachFromDisposeScope();
        for (long c = 0; c < n; c += scratch.numel())
        {
            using var scope = NewDisposeScope();
            long k = Math.Min(scratch.numel(), n - c);
            var (hi, lo) = sum.ToWords(scratch.narrow(0, 0, k).copy_(x.narrow(0, c, k)));
            sum.High.narrow(0, word + c, k).add_(hi);
            sum.Low.narrow(0, word + c, k).add_(lo);
        }
    }
}
