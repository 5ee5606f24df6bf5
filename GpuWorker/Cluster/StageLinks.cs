// The links of a pipeline stage to the same replica's stages before and after it (jobs with pp > 1).
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;

namespace DeepSeekCluster.GpuWorker.Cluster;

static class StageLinks
{
    /// <summary>
    /// Accepts the stage before (on this worker's <paramref name="pipelinePort"/>) while dialling the stage after, on a
    /// dedicated thread: a cancel ends the wait at once and closes the listener; an abandoned dial gives up at the
    /// collective timeout, and a late one is refused by the next generation's handshake.
    /// </summary>
    public static PipelineLinks Connect(RunContext run, ParallelLayout layout, int pipelinePort, CancellationToken ct)
    {
        var a = run.Assignment;
        int stage = a.PpStage, replica = a.DpRank;
        string? previous = stage > 0 ? run.EndpointOf(a.StagePeers, layout.Rank(stage - 1, replica), "pipeline") : null;
        string? next = stage < layout.Pp - 1 ? run.EndpointOf(a.StagePeers, layout.Rank(stage + 1, replica), "pipeline") : null;
        var listener = stage > 0 ? new StageListener(a.JobId, a.Generation, a.LinkKey.ToByteArray(), stage, replica, new System.Net.IPEndPoint(System.Net.IPAddress.Any, pipelinePort)) : null;
        try
        {
            var links = TrainingThread.Connect(
                () => PipelineLinks.Connect(a.JobId, a.Generation, a.LinkKey.ToByteArray(), stage, layout.Pp, replica, listener, previous, next, run.Settings.CollectiveTimeout), ct);
            run.Log($"pipeline links formed: {(previous is null ? "" : $"stage {stage - 1} at {previous}")}{(previous is not null && next is not null ? ", " : "")}" +
                    $"{(next is null ? "" : $"stage {stage + 1} at {next}")}");
            return links;
        }
        finally { listener?.Dispose(); } // an accepted link lives on without it; the next generation binds the port again
    }
}
