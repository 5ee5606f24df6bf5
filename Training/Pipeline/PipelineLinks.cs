// The two links of one stage (to the stage before and after it in its replica's pipeline) and the scalar exchange along them.
using DeepSeekCluster.Training.Collectives;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// Stage s of replica r holds <see cref="Previous"/> (to s − 1, accepted on its <see cref="StageListener"/>) and
/// <see cref="Next"/> (to s + 1, dialled); the first stage has no previous link, the last no next one. Besides the
/// activation traffic the trainer sends itself, <see cref="GatherAlongPipeline"/> gives every stage every stage's small
/// vector (gradient sum of squares, losses, expert loads): up the chain and back down, two hops per link.
/// </summary>
public sealed class PipelineLinks : IDisposable
{
    public int Stage { get; }
    public int Stages { get; }
    public int Replica { get; }
    public StageLink? Previous { get; }
    public StageLink? Next { get; }
    public bool IsFirst => Stage == 0;
    public bool IsLast => Stage == Stages - 1;

    PipelineLinks(int stage, int stages, int replica, StageLink? previous, StageLink? next)
    {
        Stage = stage;
        Stages = stages;
        Replica = replica;
        Previous = previous;
        Next = next;
    }

    /// <summary>
    /// Forms this stage's links within <paramref name="timeout"/>: accepts stage − 1 on <paramref name="listener"/> (needed
    /// unless first) while dialling stage + 1 at <paramref name="nextAddress"/> (needed unless last).
    /// <paramref name="previousAddress"/> names stage − 1 in errors. The links keep <paramref name="timeout"/> for every transfer.
    /// <paramref name="linkKey"/> is the generation's link key: the dial proves membership with it (the listener holds its own copy).
    /// </summary>
    public static PipelineLinks Connect(string jobId, long generation, byte[] linkKey, int stage, int stages, int replica,
                                        StageListener? listener, string? previousAddress, string? nextAddress, TimeSpan timeout)
    {
        if (stages < 1 || stage < 0 || stage >= stages) throw new ArgumentOutOfRangeException(nameof(stage), stage, $"stage must be in [0, {stages})");
        bool first = stage == 0, last = stage == stages - 1;
        if (!first && (listener is null || previousAddress is null))
            throw new ArgumentException($"stage {stage} needs a listener and the address of stage {stage - 1}");
        if (!last && nextAddress is null) throw new ArgumentException($"stage {stage} needs the address of stage {stage + 1}");
        if (listener is not null && (listener.Stage != stage || listener.Replica != replica || listener.JobId != jobId || listener.Generation != generation))
            throw new ArgumentException($"the listener was opened for stage {listener.Stage} replica {listener.Replica} of '{listener.JobId}' generation {listener.Generation}, not stage {stage} replica {replica} of '{jobId}' generation {generation}");

        // Dedicated thread, not the pool: a whole pipeline in one process (tests) would otherwise starve it of threads.
        var accepting = first ? null : Task.Factory.StartNew(() => listener!.Accept(previousAddress!, timeout),
            CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        StageLink? next = null;
        try
        {
            if (!last) next = StageLink.Dial(jobId, generation, linkKey, stage, replica, nextAddress!, timeout);
            var previous = accepting?.GetAwaiter().GetResult();
            return new PipelineLinks(stage, stages, replica, previous, next);
        }
        catch
        {
            next?.Dispose();
            if (accepting is not null)
            {
                if (accepting.IsCompletedSuccessfully) accepting.Result.Dispose();
                else _ = accepting.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); }, TaskScheduler.Default);
            }
            throw;
        }
    }

    /// <summary>
    /// Every stage's <paramref name="own"/> vector, indexed by stage, on every stage: stage s receives the vectors of
    /// stages 0..s−1 from before it, passes 0..s on, and the complete list comes back down from the last stage.
    /// </summary>
    public double[][] GatherAlongPipeline(double[] own)
    {
        var all = new List<double[]>(Stages);
        for (int s = 0; s < Stage; s++) all.Add(Previous!.ReceiveValues());
        all.Add(own);
        if (!IsLast)
        {
            foreach (var v in all) Next!.SendValues(v);
            all.Clear();
            for (int s = 0; s < Stages; s++) all.Add(Next!.ReceiveValues());
        }
        if (!IsFirst) foreach (var v in all) Previous!.SendValues(v);
        return all.ToArray();
    }

    /// <summary>Bytes moved over both links since they formed.</summary>
    public long BytesMoved => (Previous?.BytesMoved ?? 0) + (Next?.BytesMoved ?? 0);

    public void Dispose()
    {
        Previous?.Dispose();
        Next?.Dispose();
    }
}
