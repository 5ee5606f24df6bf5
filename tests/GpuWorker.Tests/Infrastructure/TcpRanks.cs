// Ranks of a tcp collective as threads of this test process, over real sockets on 127.0.0.1 (the ring TcpRendezvous forms,
// with its own link key per group). Not a cluster: no coordinator, no worker processes.
using System.Net;
using DeepSeekCluster.Training.Collectives.Tcp;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

static class TcpRanks
{
    /// <summary>
    /// <paramref name="world"/> ranks, each running <paramref name="body"/> on its connected collective (60 s collective
    /// timeout unless <paramref name="options"/> says otherwise); a rank that hangs past <paramref name="limit"/> (two minutes) fails the test.
    /// </summary>
    public static T[] Run<T>(int world, Func<TcpCollective, T> body, TcpCollectiveOptions? options = null, TimeSpan? limit = null)
    {
        options ??= new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(60) };
        var key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
        var rendezvous = Enumerable.Range(0, world).Select(r => new TcpRendezvous("tcp-ranks", 1, key, r, world, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
        var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
        var tasks = rendezvous.Select(rv => Task.Factory.StartNew(() =>
        {
            using var collective = rv.Connect(endpoints, options);
            return body(collective);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        if (!Task.WaitAll(tasks, limit ?? TimeSpan.FromMinutes(2))) throw new TimeoutException($"a rank of a world of {world} hung");
        return [.. tasks.Select(t => t.Result)];
    }
}
