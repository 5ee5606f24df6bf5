// The tcp collective against an independently computed float64 reference, over real sockets, world sizes 1-5 and odd sizes.
using System.Runtime.InteropServices;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class TcpCollectiveTests
{
    // Rank r's input element i: a value in [-1, 1) that differs per rank and position, from a fixed seed.
    static double[] Input(int rank, long count, int salt) { var rng = new Random(rank * 7919 + salt); return Enumerable.Range(0, (int)count).Select(_ => rng.NextDouble() * 2 - 1).ToArray(); }

    static byte[] Bytes(Tensor t) => t.dtype switch
    {
        ScalarType.Float32 => MemoryMarshal.AsBytes(t.data<float>().ToArray().AsSpan()).ToArray(),
        ScalarType.Float64 => MemoryMarshal.AsBytes(t.data<double>().ToArray().AsSpan()).ToArray(),
        ScalarType.Int64 => MemoryMarshal.AsBytes(t.data<long>().ToArray().AsSpan()).ToArray(),
        _ => MemoryMarshal.AsBytes(t.to_type(ScalarType.Float32).data<float>().ToArray().AsSpan()).ToArray(),
    };

    [Theory]
    [InlineData(1, 1)] [InlineData(1, 7)] [InlineData(1, 1000003)]
    [InlineData(2, 1)] [InlineData(2, 7)] [InlineData(2, 1000003)]
    [InlineData(3, 1)] [InlineData(3, 7)] [InlineData(3, 1000003)]
    [InlineData(4, 1)] [InlineData(4, 7)] [InlineData(4, 1000003)]
    [InlineData(5, 1)] [InlineData(5, 7)] [InlineData(5, 1000003)]
    public void AllReduceMatchesAFloat64ReferenceInEveryDtypeAndEndsBitIdenticalOnEveryRank(int world, int count)
    {
        var inputs = Enumerable.Range(0, world).Select(r => Input(r, count, count)).ToArray();
        // Reference: each rank's values as its dtype holds them, combined in float64.
        double[] Reference(Func<double, double> represent, Func<double, double, double> combine, bool average)
        {
            var result = new double[count];
            for (int i = 0; i < count; i++)
            {
                double acc = represent(inputs[0][i]);
                for (int r = 1; r < world; r++) acc = combine(acc, represent(inputs[r][i]));
                result[i] = average ? acc / world : acc;
            }
            return result;
        }
        var f32Sum = Reference(v => (float)v, (a, b) => a + b, false);
        var f64Avg = Reference(v => v, (a, b) => a + b, true);
        var i64Max = Reference(v => Math.Round(v * 1e12), Math.Max, false);
        var bf16Sum = Reference(BFloat, (a, b) => a + b, false);

        var results = RankGroup.Run(world, c =>
        {
            var x = inputs[c.Rank];
            using var a = tensor(x.Select(v => (float)v).ToArray());
            using var b = tensor(x);
            using var i = tensor(x.Select(v => (long)Math.Round(v * 1e12)).ToArray());
            using var h = tensor(x.Select(v => (float)v).ToArray()).to_type(ScalarType.BFloat16);
            c.AllReduce(a, ReduceOp.Sum);
            c.AllReduce(b, ReduceOp.Avg);
            c.AllReduce(i, ReduceOp.Max);
            c.AllReduce(h, ReduceOp.Sum);
            return (f32: a.data<float>().ToArray(), f64: b.data<double>().ToArray(), i64: i.data<long>().ToArray(),
                    bf16: h.to_type(ScalarType.Float32).data<float>().ToArray(), bytes: Bytes(a).Concat(Bytes(b)).Concat(Bytes(h)).ToArray());
        });

        var first = results[0];
        for (int k = 0; k < count; k++)
        {
            Assert.True(Math.Abs(first.f32[k] - f32Sum[k]) <= 1e-6 * world, $"f32 sum [{k}]: {first.f32[k]} vs {f32Sum[k]}");
            Assert.True(Math.Abs(first.f64[k] - f64Avg[k]) <= 1e-14, $"f64 avg [{k}]: {first.f64[k]} vs {f64Avg[k]}");
            Assert.Equal((long)i64Max[k], first.i64[k]);
            Assert.True(Math.Abs(first.bf16[k] - bf16Sum[k]) <= 0.02 * world, $"bf16 sum [{k}]: {first.bf16[k]} vs {bf16Sum[k]}");
        }
        foreach (var other in results.Skip(1)) Assert.Equal(first.bytes, other.bytes);
    }

    // bfloat16 rounding of a double, written out independently of the collective's own conversion.
    static double BFloat(double v)
    {
        float f = (float)v;
        uint bits = BitConverter.SingleToUInt32Bits(f);
        uint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
        return BitConverter.UInt32BitsToSingle(rounded);
    }

    [Theory]
    [InlineData(1, 7)] [InlineData(2, 1)] [InlineData(2, 200003)]
    [InlineData(3, 7)] [InlineData(4, 1)] [InlineData(5, 7)] [InlineData(5, 200003)]
    public void ReduceScatterAndAllGatherMatchTheReference(int world, int part)
    {
        var inputs = Enumerable.Range(0, world).Select(r => Input(r, (long)part * world, part + 1)).ToArray();
        var results = RankGroup.Run(world, c =>
        {
            using var input = tensor(inputs[c.Rank]);
            using var reduced = zeros(part, dtype: ScalarType.Float64);
            c.ReduceScatter(input, reduced, ReduceOp.Sum);
            using var own = tensor(inputs[c.Rank].Take(part).Select(v => (float)v).ToArray());
            using var gathered = zeros(part * world, dtype: ScalarType.Float32);
            c.AllGather(own, gathered);
            return (reduced: reduced.data<double>().ToArray(), gathered: gathered.data<float>().ToArray());
        });
        for (int r = 0; r < world; r++)
        {
            for (int k = 0; k < part; k++)
            {
                double expected = 0;
                for (int q = 0; q < world; q++) expected += inputs[q][r * part + k];
                Assert.True(Math.Abs(results[r].reduced[k] - expected) < 1e-13, $"rank {r} part [{k}]");
            }
            for (int q = 0; q < world; q++)
                for (int k = 0; k < part; k++)
                    Assert.Equal((float)inputs[q][k], results[r].gathered[q * part + k]);
        }
    }

    [Theory]
    [InlineData(1, 0, 7)] [InlineData(2, 1, 1)] [InlineData(3, 2, 1000003)] [InlineData(4, 1, 7)] [InlineData(5, 3, 1000003)]
    public void BroadcastCopiesTheRootsTensorToEveryRank(int world, int root, int count)
    {
        var source = Input(root, count, 11);
        var results = RankGroup.Run(world, c =>
        {
            using var t = c.Rank == root ? tensor(source) : zeros(count, dtype: ScalarType.Float64);
            c.Broadcast(t, root);
            return t.data<double>().ToArray();
        });
        foreach (var r in results) Assert.Equal(source, r);
    }

    [Fact]
    public void SendAndRecvReachAnyPeerInBothDirectionsAndNonContiguousTensorsWork()
    {
        var results = RankGroup.Run(4, c =>
        {
            using var payload = arange(0, 1001, dtype: ScalarType.Int64) + 1000 * c.Rank;
            using var got = zeros(1001, dtype: ScalarType.Int64);
            if (c.Rank == 0) { c.Send(payload, 2); c.Recv(got, 3); }
            if (c.Rank == 2) { c.Recv(got, 0); c.Send(payload, 3); }
            if (c.Rank == 3) { c.Recv(got, 2); c.Send(payload, 0); }
            using var grid = arange(0, 12, dtype: ScalarType.Float32).reshape(3, 4).t(); // a transposed view
            c.AllReduce(grid, ReduceOp.Sum);
            c.Barrier();
            return (first: got[0].item<long>(), grid: grid.contiguous().data<float>().ToArray());
        });
        Assert.Equal(0, results[2].first);
        Assert.Equal(2000, results[3].first);
        Assert.Equal(3000, results[0].first);
        using var expected = (arange(0, 12, dtype: ScalarType.Float32).reshape(3, 4).t() * 4).contiguous();
        foreach (var r in results) Assert.Equal(expected.data<float>().ToArray(), r.grid);
    }

    [Fact]
    public void APeerThatDiesInTheMiddleOfAnAllReduceFailsEveryOtherRankWithinTheTimeoutNamingIt()
    {
        const int world = 4, victim = 2;
        var timeout = TimeSpan.FromSeconds(3);
        var options = new TcpCollectiveOptions { Timeout = timeout, ChunkBytes = 64 << 10 };
        string? victimAddress = null;
        var outcomes = RankGroup.Outcomes(world, c =>
        {
            if (c.Rank == victim)
            {
                victimAddress = $"127.0.0.1:{c.Rendezvous.LocalEndpoint.Port}";
                int frames = 0;
                c.FrameReceived = () => { if (++frames == 3) c.Dispose(); }; // the process dies: its sockets close mid-operation
            }
            using var t = ones(1 << 20, dtype: ScalarType.Float32);
            c.AllReduce(t);
            return 0;
        }, options);
        for (int r = 0; r < world; r++)
        {
            if (r == victim) continue;
            var e = Assert.IsType<CollectiveException>(outcomes[r].Error);
            Assert.Equal(victim, e.PeerRank);
            Assert.Contains($"rank {victim} ({victimAddress})", e.Message);
            Assert.True(outcomes[r].Elapsed < timeout, $"rank {r} took {outcomes[r].Elapsed} to fail: {e.Message}");
        }
    }

    [Fact]
    public void APeerThatStallsFailsEveryOtherRankWithinTheTimeoutNamingIt()
    {
        const int world = 4, victim = 1;
        var timeout = TimeSpan.FromSeconds(2);
        var outcomes = RankGroup.Outcomes(world, c =>
        {
            // The stall is the subject: alive, connected, never calls the all-reduce, and stays so until the others must have
            // decided: they must notice the stall itself, not a close.
            if (c.Rank == victim) { Thread.Sleep(timeout * 3); return 0; }
            using var t = ones(1000, dtype: ScalarType.Float32);
            c.AllReduce(t);
            return 0;
        }, new TcpCollectiveOptions { Timeout = timeout });
        for (int r = 0; r < world; r++)
        {
            if (r == victim) continue;
            var e = Assert.IsType<CollectiveException>(outcomes[r].Error);
            Assert.True(victim == e.PeerRank, $"rank {r} blamed rank {e.PeerRank}: {e.Message}");
            Assert.Equal(CollectiveFailure.PeerStalled, e.Failure);
            Assert.True(outcomes[r].Elapsed < timeout * 2, $"rank {r} took {outcomes[r].Elapsed}"); // bounded by the timeout, with slack for a loaded CI machine
        }
    }

    [Fact]
    public void AfterAFailureTheCollectiveRefusesEveryLaterCall()
    {
        var outcomes = RankGroup.Outcomes(2, c =>
        {
            if (c.Rank == 1) { c.Dispose(); return 0; }
            using var t = ones(10);
            Assert.Throws<CollectiveException>(() => c.AllReduce(t)); // the failure: its peer is gone
            c.Barrier();
            return 1;
        }, new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(2) });
        var e = Assert.IsType<CollectiveException>(outcomes[0].Error);
        Assert.Contains("failed earlier", e.Message);
    }

    [Fact]
    public async Task APeerOfAStaleGenerationIsRefusedAndTheCurrentGroupStillForms()
    {
        var options = new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(10) };
        using var rank0 = new TcpRendezvous("job", 5, LinkKeys.Test, 0, 2, new(System.Net.IPAddress.Loopback, 0));
        using var rank1 = new TcpRendezvous("job", 5, LinkKeys.Test, 1, 2, new(System.Net.IPAddress.Loopback, 0));
        var endpoints = new[] { $"127.0.0.1:{rank0.LocalEndpoint.Port}", $"127.0.0.1:{rank1.LocalEndpoint.Port}" };
        using var zombie = new TcpRendezvous("job", 4, LinkKeys.Test, 0, 2, new(System.Net.IPAddress.Loopback, 0));
        var refused = Assert.Throws<CollectiveException>(() => zombie.Connect([$"127.0.0.1:{zombie.LocalEndpoint.Port}", endpoints[1]], options with { Timeout = TimeSpan.FromSeconds(3) }));
        Assert.Equal(CollectiveFailure.Refused, refused.Failure);
        Assert.Equal(1, refused.PeerRank);
        Assert.Contains("generation 4 does not match this group's generation 5", refused.Message);

        var formed = new[] { rank0, rank1 }.Select(rv => Task.Run(() =>
        {
            using var c = rv.Connect(endpoints, options);
            using var t = ones(3);
            c.AllReduce(t);
            return t.sum().item<float>();
        })).ToArray();
        var sums = await Task.WhenAll(formed).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.All(sums, sum => Assert.Equal(6f, sum));
        Assert.True(rank1.RefusedCount >= 1);
    }

    [Fact]
    public void ARendezvousWhosePeerNeverComesFailsWithinTheTimeoutNamingIt()
    {
        using var rank0 = new TcpRendezvous("job", 1, LinkKeys.Test, 0, 2, new(System.Net.IPAddress.Loopback, 0));
        using var absent = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
        absent.Bind(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0)); // a port nobody listens on
        string absentAddress = $"127.0.0.1:{((System.Net.IPEndPoint)absent.LocalEndPoint!).Port}";
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<CollectiveException>(() => rank0.Connect([$"127.0.0.1:{rank0.LocalEndpoint.Port}", absentAddress], new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(1) }));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"took {clock.Elapsed}");
        Assert.Equal(1, e.PeerRank);
        Assert.Contains($"rank 1 ({absentAddress})", e.Message);
    }
}
