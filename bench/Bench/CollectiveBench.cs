// All-reduce benchmark of the tcp collective over loopback: algorithm and bus bandwidth beside this machine's memory-copy bandwidth.
using System.Diagnostics;
using System.Net;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// Ranks run as threads of this process over real sockets on 127.0.0.1, so every byte crosses the kernel's loopback path
/// twice (send copy, receive copy) and the reduction runs on the same cores: the ceiling is memory bandwidth, which is
/// measured first. Algorithm bandwidth = tensor bytes / time; bus bandwidth = algbw x 2(W-1)/W (the bytes each rank's
/// link carries in a ring all-reduce), the figure comparable across world sizes and with NCCL's tests.
/// </summary>
public static class CollectiveBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("collectives", args);
        var worlds = o.Ints("--worlds", "2,4", 1);
        var sizesMb = o.Ints("--sizes-mb", "1,4,16,64,256", 1);
        int chunk = o.Int("--chunk-kb", 1024, 1) << 10;
        double seconds = o.Double("--seconds", 1.5, above: 0);
        o.Done();

        Console.WriteLine($"# DeepSeekCluster collective benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores; tcp backend over 127.0.0.1, ranks as threads, chunk {chunk >> 10} KiB, float32 sum");
        double copy = MemoryCopyBandwidth(256 << 20);
        Console.WriteLine($"memory copy (256 MiB, single thread): {copy / 1e9:F2} GB/s");
        Console.WriteLine();
        Console.WriteLine("| world | size MB | time ms | algbw GB/s | busbw GB/s | busbw / memcpy |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (int world in worlds)
            foreach (int mb in sizesMb)
            {
                double t = TimeAllReduce(world, (long)mb << 20, chunk, seconds);
                double alg = ((long)mb << 20) / t, bus = alg * 2 * (world - 1) / world;
                Console.WriteLine($"| {world} | {mb} | {t * 1e3:F1} | {alg / 1e9:F2} | {bus / 1e9:F2} | {bus / copy:P0} |");
            }
    }

    /// <summary>Bytes per second of copying one buffer into another (the cost every hop of the ring pays at least twice).</summary>
    internal static double MemoryCopyBandwidth(int bytes)
    {
        var a = GC.AllocateUninitializedArray<byte>(bytes);
        var b = GC.AllocateUninitializedArray<byte>(bytes);
        new Random(1).NextBytes(a);
        b.AsSpan().Fill(1); // touch the pages before timing
        double best = double.MaxValue;
        for (int i = 0; i < 5; i++)
        {
            var sw = Stopwatch.StartNew();
            a.AsSpan().CopyTo(b);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return bytes / best;
    }

    /// <summary>Median seconds of one all-reduce of <paramref name="bytes"/> over <paramref name="world"/> ranks (after a warm-up).</summary>
    static double TimeAllReduce(int world, long bytes, int chunk, double budgetSeconds)
    {
        var options = new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(60), ChunkBytes = chunk };
        var key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
        var rendezvous = Enumerable.Range(0, world).Select(r => new TcpRendezvous("bench", 1, key, r, world, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
        var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
        var threads = rendezvous.Select(rv => Task.Factory.StartNew(() =>
        {
            using var c = rv.Connect(endpoints, options);
            using var x = ones(bytes / 4, dtype: ScalarType.Float32);
            c.AllReduce(x); // warm-up: page faults, socket buffers
            var times = new List<double>();
            var total = Stopwatch.StartNew();
            while (true)
            {
                c.Barrier();
                var sw = Stopwatch.StartNew();
                c.AllReduce(x);
                times.Add(sw.Elapsed.TotalSeconds);
                // every rank decides to stop on the same iteration: rank 0's decision is broadcast
                using var more = tensor(new long[] { c.Rank == 0 && (total.Elapsed.TotalSeconds > budgetSeconds || times.Count >= 50) ? 0 : 1 });
                c.Broadcast(more, 0);
                if (more.item<long>() == 0 && times.Count >= 3) break;
            }
            times.Sort();
            return times[times.Count / 2];
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        Task.WaitAll(threads);
        return threads.Max(t => t.Result);
    }
}
