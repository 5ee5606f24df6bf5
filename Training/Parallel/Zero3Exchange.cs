// ZeRO-3's exchanges off the compute thread: one ordered queue of collective calls (the prefetched gathers and the
// per-layer gradient reduce-scatters), and the reduce-scatter of one layer's gradients into the exact sum's own words.
using System.Collections.Concurrent;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>
/// Runs ZeRO-3's collective calls on one thread of their own, strictly in the order they are posted. Every rank posts
/// the same calls in the same order (the same layers gather and finish their backward in the same order everywhere), so
/// the ring sees one sequence on every rank, however the compute and the exchange interleave in time; the compute thread
/// only waits for the call whose result it needs. Nothing else may use the collective while a call is queued:
/// <see cref="Drain"/> before any other exchange. Synchronous (<paramref name="async"/> false: a CUDA collective on the
/// default stream, or overlap switched off), each call runs on the poster's thread at once.
/// </summary>
sealed class OrderedExchange : IDisposable
{
    readonly BlockingCollection<(Action Work, TaskCompletionSource Done)>? queue;
    readonly Thread? thread;
    Task last = Task.CompletedTask;
    Exception? fault; // the first call that failed: the calls after it are not run (another rank would wait on them)

    public OrderedExchange(bool async, string name = "zero3-exchange")
    {
        if (!async) return;
        queue = [];
        thread = new Thread(Loop) { IsBackground = true, Name = name };
        thread.Start();
    }

    public bool Async => queue is not null;

    /// <summary>
    /// Whether exchanges over <paramref name="collective"/> get a thread of their own: on a CPU collective, yes; on CUDA no
    /// (NCCL enqueues on the default stream, which orders them after the kernels that wrote their inputs).
    /// <paramref name="forced"/> overrides the device's answer (TrainingOptions.ExchangeThread, a test seam).
    /// </summary>
    public static bool RunsOnThread(ICollective collective, bool? forced = null) =>
        forced ?? collective.Device.type == TorchSharp.DeviceType.CPU;

    /// <summary>Queues <paramref name="work"/> after every call posted before it; the task ends when it has run.</summary>
    public Task Post(Action work)
    {
        if (queue is null)
        {
            using (no_grad()) work();
            return Task.CompletedTask;
        }
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        queue.Add((work, done));
        return last = done.Task;
    }

    /// <summary>Waits for <paramref name="task"/>, rethrowing its own exception (a CollectiveException stays one).</summary>
    public static void Wait(Task task) => task.GetAwaiter().GetResult();

    /// <summary>Waits until every posted call has run; the first failure among them is thrown.</summary>
    public void Drain()
    {
        Wait(last);
        if (Volatile.Read(ref fault) is { } e) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(e);
    }

    void Loop()
    {
        foreach (var (work, done) in queue!.GetConsumingEnumerable())
        {
            if (Volatile.Read(ref fault) is { } earlier) { done.SetException(earlier); continue; }
            try
            {
                using var noGrad = no_grad(); // grad mode is per thread: this one's starts on
                using var scope = NewDisposeScope();
                work();
                done.SetResult();
            }
            catch (Exception e)
            {
                Volatile.Write(ref fault, e);
                done.SetException(e);
            }
        }
    }

    /// <summary>Lets the queued calls run out (a failed collective fails them quickly) and ends the thread.</summary>
    public void Dispose()
    {
        if (queue is null) return;
        queue.CompleteAdding();
        thread!.Join();
        queue.Dispose();
    }
}

/// <summary>
/// One group of parameters' gradients (a decoder layer's, or those outside the layers) reduce-scattered into the exact
/// sum's words of this rank's rows: ExactGradientSum's ZeRO-2 scatter, for a group at a time. The group is laid out in
/// a partition of its own (<paramref name="shards"/>: shard d's rows of each member, padded to the longest shard), each
/// window of it converted to words, reduce-scattered, and this rank's part added where its rows' words sit in the whole
/// sum. The words are integers and each element's conversion is the same elementwise arithmetic, so the sum is the same
/// bits as a scatter of the whole model after the backward, in whatever groups and order the words arrive.
/// </summary>
sealed class LayerGradientScatter
{
    readonly ICollective collective;
    readonly ZeroShards shards;
    readonly int shard;
    readonly ExactGradientSum sum;
    readonly long window;
    readonly (long Word, long Element)[] own; // per member: where its rows' words start in the sum's region, and their first element

    public LayerGradientScatter(ICollective collective, int shard, ZeroShards shards, IReadOnlyList<int> members, ExactGradientSum sum, long bucketBytes)
    {
        var whole = sum.Shards;
        if (whole is null || !sum.ShardOnly || sum.OwnShard != shard || whole.Shards != shards.Shards)
            throw new ArgumentException($"a per-layer scatter adds into a sum that keeps shard {shard}'s words of {shards.Shards} alone", nameof(sum));
        this.collective = collective;
        this.shards = shards;
        this.shard = shard;
        this.sum = sum;
        long region = shard * whole.ShardWords;
        own = [.. members.Select(m => whole.PiecesOf(m)[shard]).Select(p => (p.Word - region, p.Element))];
        window = Math.Clamp(bucketBytes / sizeof(long) / shards.Shards, 1, shards.ShardWords);
    }

    /// <summary>Adds <paramref name="grads"/> (one per member, null: zero) to the sum; every rank calls it for the same group at the same point.</summary>
    public void Add(IReadOnlyList<Tensor?> grads)
    {
        using var noGrad = no_grad();
        int dp = shards.Shards;
        var flats = grads.Select(g => g?.detach().reshape(-1)).ToArray();
        try
        {
            using var scratch = zeros(dp * window, dtype: ScalarType.Float64, device: sum.High.device);
            using var part = empty(window, dtype: ScalarType.Int64, device: sum.High.device);
            for (long c = 0; c < shards.ShardWords; c += window)
            {
                using var scope = NewDisposeScope();
                long k = Math.Min(window, shards.ShardWords - c);
                var x = scratch.narrow(0, 0, dp * k);
                shards.FillWindow(x, flats, c, k);
                var (hi, lo) = sum.ToWords(x);
                var mine = part.narrow(0, 0, k);
                collective.ReduceScatter(hi, mine, ReduceOp.Sum);
                AddOwn(sum.High, mine, c, k);
                collective.ReduceScatter(lo, mine, ReduceOp.Sum);
                AddOwn(sum.Low, mine, c, k);
            }
        }
        finally
        {
            foreach (var f in flats) f?.Dispose();
        }
    }

    void AddOwn(Tensor words, Tensor mine, long column, long width)
    {
        foreach (var (piece, from, length, at) in shards.Window(shard, column, width))
        {
            var (word, element) = own[piece.Param];
            using var target = words.narrow(0, word + piece.Element + from - element, length);
            using var source = mine.narrow(0, at, length);
            target.add_(source);
        }
    }
}
