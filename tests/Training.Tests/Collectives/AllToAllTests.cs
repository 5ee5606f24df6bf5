// All-to-all with per-peer counts over the tcp collective: every rank gets exactly the rows every other rank addressed to
// it, for worlds 2 to 5 with uneven and zero counts; a dead or stalled peer is named within the timeout.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class AllToAllTests
{
    const int RowSize = 3;

    /// <summary>Rows rank <paramref name="from"/> sends rank <paramref name="to"/>: uneven, and zero for some pairs (self included).</summary>
    static long Count(int from, int to, int round) => (from * 3 + to * 5 + round) % 4;

    /// <summary>The value of element <paramref name="e"/> of row <paramref name="row"/> that rank <paramref name="from"/> sends rank <paramref name="to"/>.</summary>
    static double Value(int from, int to, long row, int e) => from * 1e6 + to * 1e4 + row * 10 + e;

    static Tensor Input(int rank, int world, int round)
    {
        var rows = new List<double>();
        for (int to = 0; to < world; to++)
            for (long row = 0; row < Count(rank, to, round); row++)
                for (int e = 0; e < RowSize; e++) rows.Add(Value(rank, to, row, e));
        return tensor(rows.ToArray(), dtype: ScalarType.Float64).reshape(-1, RowSize);
    }

    /// <summary>The reference: what rank <paramref name="rank"/> must hold, built from the definition, not from the collective.</summary>
    static double[] Expected(int rank, int world, int round)
    {
        var rows = new List<double>();
        for (int from = 0; from < world; from++)
            for (long row = 0; row < Count(from, rank, round); row++)
                for (int e = 0; e < RowSize; e++) rows.Add(Value(from, rank, row, e));
        return [.. rows];
    }

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    public void EveryRankReceivesExactlyTheRowsAddressedToItWithUnevenAndZeroCounts(int world)
    {
        var results = RankGroup.Run(world, c =>
        {
            var rounds = new List<double[]>();
            for (int round = 0; round < 3; round++) // the links made in the first round carry the later ones
            {
                using var input = Input(c.Rank, world, round);
                var send = Enumerable.Range(0, world).Select(to => Count(c.Rank, to, round)).ToArray();
                var receive = Enumerable.Range(0, world).Select(from => Count(from, c.Rank, round)).ToArray();
                using var output = full(receive.Sum(), RowSize, double.NaN, dtype: ScalarType.Float64);
                c.AllToAll(input, send, output, receive);
                rounds.Add(output.data<double>().ToArray());
            }
            return rounds;
        });
        Assert.Contains(Enumerable.Range(0, world), r => Count(r, (r + 1) % world, 0) == 0 || Count(r, r, 0) == 0); // some pair sends nothing
        for (int r = 0; r < world; r++)
            for (int round = 0; round < 3; round++)
                Assert.Equal(Expected(r, world, round), results[r][round]);
    }

    [Fact]
    public void CountsThatDoNotFitTheTensorsAreRefusedNamingTheNumbers()
    {
        var errors = RankGroup.Run(2, c =>
        {
            using var input = zeros(5, RowSize, dtype: ScalarType.Float64);
            using var output = zeros(4, RowSize, dtype: ScalarType.Float64);
            return Assert.Throws<ArgumentException>(() => c.AllToAll(input, [2, 2], output, [2, 2])).Message;
        });
        Assert.All(errors, m => Assert.Contains("sends 4 rows in all, but the input has 5", m));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ADeadOrStalledPeerFailsEveryOtherRankWithinTheTimeoutNamingIt(bool stalls)
    {
        const int world = 4, victim = 2;
        var timeout = TimeSpan.FromSeconds(2);
        var outcomes = RankGroup.Outcomes(world, c =>
        {
            using var input = ones(world * 2, RowSize, dtype: ScalarType.Float64);
            using var output = zeros(world * 2, RowSize, dtype: ScalarType.Float64);
            long[] two = [.. Enumerable.Repeat(2L, world)];
            c.AllToAll(input, two, output, two); // the links are up: the failure is the peer's, not the formation's
            if (c.Rank == victim)
            {
                // The stall is the subject: alive and connected, but never calls, for longer than the others may wait.
                if (stalls) { Thread.Sleep(timeout * 3); return 0; }
                c.Dispose(); // dies: its sockets close
                return 0;
            }
            var clock = System.Diagnostics.Stopwatch.StartNew();
            try { c.AllToAll(input, two, output, two); }
            catch (CollectiveException e) { throw new TimeoutException($"{clock.Elapsed.TotalSeconds:0.##}", e); }
            return 1;
        }, new TcpCollectiveOptions { Timeout = timeout }, limit: TimeSpan.FromSeconds(30));
        for (int r = 0; r < world; r++)
        {
            if (r == victim) continue;
            var wrapped = Assert.IsType<TimeoutException>(outcomes[r].Error);
            var e = Assert.IsType<CollectiveException>(wrapped.InnerException);
            Assert.True(victim == e.PeerRank, $"rank {r} blamed rank {e.PeerRank}: {e.Message}");
            Assert.Equal(stalls ? CollectiveFailure.PeerStalled : CollectiveFailure.PeerLost, e.Failure);
            double seconds = double.Parse(wrapped.Message, System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(seconds < timeout.TotalSeconds * 1.5, $"rank {r} took {seconds} s to fail: {e.Message}"); // slack for a loaded CI machine
        }
    }
}
