// Runs W ranks of a tcp collective as threads of this process over real sockets on 127.0.0.1.
using System.Net;
using DeepSeekCluster.Training.Collectives.Tcp;

namespace DeepSeekCluster.Training.Tests.Collectives;

static class RankGroup
{
    /// <summary>Binds W rendezvous on 127.0.0.1:0, then runs <paramref name="body"/> on each rank's own thread; a hang fails the test.</summary>
    public static T[] Run<T>(int world, Func<TcpCollective, T> body, TcpCollectiveOptions? options = null, string job = "test-job", long generation = 1, TimeSpan? limit = null)
    {
        options ??= new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(20) };
        var rendezvous = Enumerable.Range(0, world).Select(r => new TcpRendezvous(job, generation, LinkKeys.Test, r, world, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
        var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
        var tasks = rendezvous.Select(rv => Task.Factory.StartNew(() =>
        {
            using var collective = rv.Connect(endpoints, options);
            return body(collective);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        if (!Task.WaitAll(tasks, limit ?? TimeSpan.FromSeconds(60)))
            throw new TimeoutException($"a rank of a world of {world} hung");
        return tasks.Select(t => t.Result).ToArray();
    }

    /// <summary>Like <see cref="Run{T}"/> but returns each rank's outcome (value or exception) instead of throwing.</summary>
    /// <remarks>
    /// libtorch is loaded before the clocks start: the first tensor of a process loads it (about 3 s on the 2-core VM),
    /// and inside a rank's timed body that load made a stall look 3 s slower to notice than the timeout allows.
    /// </remarks>
    public static (T? Value, Exception? Error, TimeSpan Elapsed)[] Outcomes<T>(int world, Func<TcpCollective, T> body, TcpCollectiveOptions options, TimeSpan? limit = null)
    {
        using (TorchSharp.torch.ones(1)) { }
        return Run(world, c =>
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            try { return ((T?)body(c), (Exception?)null, clock.Elapsed); }
            catch (Exception e) { return (default, e, clock.Elapsed); }
        }, options, limit: limit);
    }
}
