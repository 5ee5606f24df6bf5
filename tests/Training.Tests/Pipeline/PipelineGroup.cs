// Runs dp x pp pipeline ranks as threads of this process over real loopback sockets: stage links and per-stage dp rings.
using System.Net;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tests.Collectives;

namespace DeepSeekCluster.Training.Tests.Pipeline;

/// <summary>One rank's place: its stage and replica, its links along the pipeline, and its stage's dp collective (null when dp = 1).</summary>
sealed record PipelineRank(int Stage, int Replica, PipelineLinks Links, ICollective? StageGroup);

static class PipelineGroup
{
    /// <summary>
    /// Binds every rank's stage listener and (dp &gt; 1) its stage's ring rendezvous on 127.0.0.1:0, then runs
    /// <paramref name="body"/> on one thread per rank (stage-major rank order in the result); a hang fails the test.
    /// </summary>
    public static T[] Run<T>(int dp, int pp, Func<PipelineRank, T> body, TimeSpan? timeout = null, TimeSpan? limit = null, string job = "pp-job", long generation = 1)
    {
        var linkTimeout = timeout ?? TimeSpan.FromSeconds(30);
        var listeners = new StageListener[pp, dp];
        var rings = new TcpRendezvous[pp, dp];
        for (int s = 0; s < pp; s++)
            for (int r = 0; r < dp; r++)
            {
                listeners[s, r] = new StageListener(job, generation, LinkKeys.Test, s, r, new IPEndPoint(IPAddress.Loopback, 0));
                rings[s, r] = new TcpRendezvous($"{job}/stage-{s}", generation, LinkKeys.Test, r, dp, new IPEndPoint(IPAddress.Loopback, 0));
            }
        string Address(int s, int r) => $"127.0.0.1:{listeners[s, r].LocalEndpoint.Port}";
        var tasks = new List<Task<T>>();
        for (int s = 0; s < pp; s++)
            for (int r = 0; r < dp; r++)
            {
                int stage = s, replica = r;
                tasks.Add(Task.Factory.StartNew(() =>
                {
                    using var listener = listeners[stage, replica];
                    var ringEndpoints = Enumerable.Range(0, dp).Select(x => $"127.0.0.1:{rings[stage, x].LocalEndpoint.Port}").ToList();
                    using var ring = dp > 1 ? rings[stage, replica].Connect(ringEndpoints, new TcpCollectiveOptions { Timeout = linkTimeout }) : null;
                    if (dp == 1) rings[stage, replica].Dispose();
                    using var links = PipelineLinks.Connect(job, generation, LinkKeys.Test, stage, pp, replica, stage == 0 ? null : listener,
                        stage == 0 ? null : Address(stage - 1, replica), stage == pp - 1 ? null : Address(stage + 1, replica), linkTimeout);
                    return body(new PipelineRank(stage, replica, links, ring));
                }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
            }
        if (!Task.WaitAll([.. tasks], limit ?? TimeSpan.FromSeconds(300)))
            throw new TimeoutException($"a rank of a {dp} x {pp} pipeline hung");
        return tasks.Select(t => t.Result).ToArray();
    }
}
