// The live-replica path of an elastic worker over a real tcp ring on 127.0.0.1 (ranks are threads of this process):
// agreeing where to resume, copying the newest state bit for bit, and a cancel that does not wait for the collective timeout.
using System.Net;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

namespace DeepSeekCluster.GpuWorker.Tests;

public class ReplicaSyncTests
{
    [Fact]
    public void TheNewestReplicaIsBroadcastAndEveryRankEndsBitwiseIdenticalIncludingOneThatHeldNothing()
    {
        // Rank 0 holds step 5, rank 1 step 7 (the newest), rank 2 nothing (a worker that just joined).
        using var r0 = new TrainedState(seed: 11);
        using var r1 = new TrainedState(seed: 22);
        using var r2 = new TrainedState(seed: 33, fill: false);
        r1.Optimizer.StepCount = 41;
        var states = new[] { r0, r1, r2 };
        var held = new[] { new HeldState(5, 101), new HeldState(7, 202), new HeldState(-1, 0) };
        // The expected bytes, copied before anything moves: rank 1's tensors.
        var expected = r1.Tensors.Select(kv => (kv.Key, Value: kv.Value.detach().clone())).ToList();
        Assert.NotEqual(ReplicaSync.Hash(r0.Tensors), ReplicaSync.Hash(r1.Tensors));

        var outcomes = Run(3, c =>
        {
            var state = states[c.Rank];
            var all = ReplicaSync.ExchangeHeldSteps(c, held[c.Rank]);
            var plan = ReplicaSync.Decide(all, committedStep: 4);
            long step = held[c.Rank].Step, optimizerSteps = state.Optimizer.StepCount, lineage = held[c.Rank].Lineage;
            long bytes = ReplicaSync.Broadcast(c, plan.SourceRank, state.Tensors, ref step, ref optimizerSteps, ref lineage);
            state.Optimizer.StepCount = optimizerSteps; // as the worker applies the counters
            return (Plan: plan, Step: step, OptimizerSteps: optimizerSteps, Lineage: lineage, Bytes: bytes, Hash: ReplicaSync.Hash(state.Tensors));
        });

        foreach (var o in outcomes)
        {
            Assert.Equal(held, o.Plan.Held);
            Assert.Equal((7L, ResumePlan.Replica, 1), (o.Plan.Step, o.Plan.Source, o.Plan.SourceRank));
            Assert.Equal((7L, 41L, 202L), (o.Step, o.OptimizerSteps, o.Lineage));
            Assert.Equal(outcomes[1].Hash, o.Hash);
            Assert.True(o.Bytes > 0);
        }
        // Independently of the hash: every tensor of every rank equals rank 1's original bytes, moments included.
        foreach (var state in states)
        {
            var tensors = state.Tensors;
            Assert.Equal(expected.Count, tensors.Count);
            Assert.Contains(tensors, kv => kv.Key.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
            for (int i = 0; i < expected.Count; i++)
            {
                Assert.Equal(expected[i].Key, tensors[i].Key);
                Assert.True(TrainedState.BitwiseEqual(expected[i].Value, tensors[i].Value), $"{tensors[i].Key} differs from the source's");
            }
            Assert.Equal(41, state.Optimizer.StepCount);
        }
        Assert.Equal(expected.Sum(e => e.Value.numel() * e.Value.element_size()), outcomes[0].Bytes);
        foreach (var (_, t) in expected) t.Dispose();
    }

    [Theory]
    [InlineData(new long[] { -1, 3, 3 }, 5, "checkpoint", 5, -1)]   // the live state is older than the committed checkpoint
    [InlineData(new long[] { -1, -1 }, 0, "start", 0, -1)]          // nobody holds anything, nothing is committed
    [InlineData(new long[] { 4, 6, 6 }, 6, "replica", 6, 1)]         // a tie with the checkpoint: the replica, lowest rank
    [InlineData(new long[] { -1, 0 }, 0, "start", 0, -1)]            // a fresh state is no better than the start
    public void ThePlanPrefersALiveStateAtLeastAsNewAsTheCheckpoint(long[] steps, long committed, string source, long step, int sourceRank)
    {
        var plan = ReplicaSync.Decide([.. steps.Select(s => new HeldState(s, s >= 0 ? 7 : 0))], committed);
        Assert.Equal((source, step, sourceRank), (plan.Source, plan.Step, plan.SourceRank));
    }

    [Fact]
    public void RanksAtTheSameStepOfAnotherHistoryStillReceiveTheSourcesState()
    {
        var same = ReplicaSync.Decide([new HeldState(9, 5), new HeldState(9, 5)], 0);
        Assert.False(same.AnyRankBehind);
        var diverged = ReplicaSync.Decide([new HeldState(9, 5), new HeldState(9, 6)], 0);
        Assert.True(diverged.AnyRankBehind);
    }

    [Fact]
    public void ACancelUnblocksARankStuckInAnAllReduceWhosePeerNeverArrivesLongBeforeTheCollectiveTimeout()
    {
        var options = new TcpCollectiveOptions { Timeout = TimeSpan.FromMinutes(5) };
        using var peerGone = new ManualResetEventSlim();
        var outcomes = Run<(Exception? Error, bool Boundary)>(2, c =>
        {
            if (c.Rank == 1) { peerGone.Wait(TimeSpan.FromMinutes(2)); return (null, true); } // never joins the all-reduce
            using var cancellation = new RunCancellation();
            using var guard = cancellation.Guard(c);
            using var grads = ones(1 << 16);
            // The cancel comes once the all-reduce waits on its silent peer: a cancel before it began would fail it the same way.
            using var blocked = new ManualResetEventSlim();
            c.ReceiveWaiting = blocked.Set;
            var canceller = Task.Run(() =>
            {
                Assert.True(blocked.Wait(TimeSpan.FromSeconds(60)), "rank 0's all-reduce never waited on its peer");
                cancellation.Cancel(TimeSpan.FromMilliseconds(200));
            });
            try { c.AllReduce(grads, ReduceOp.Avg); return (null, false); }
            catch (Exception e) { return (e, cancellation.Boundary.IsCancellationRequested && cancellation.IsAborted); }
            finally { canceller.Wait(); peerGone.Set(); }
        }, options, limit: TimeSpan.FromSeconds(60)); // far below the 5 minute collective timeout
        var error = Assert.IsType<CollectiveException>(outcomes[0].Error);
        Assert.Equal(CollectiveFailure.Unavailable, error.Failure);
        Assert.True(outcomes[0].Boundary);
    }

    [Fact]
    public void TheBoundaryIsCancelledAtOnceAndTheAbortOnlyAfterTheGraceOrWhenAskedNow()
    {
        using var cancellation = new RunCancellation();
        cancellation.Cancel(TimeSpan.FromMinutes(10));
        Assert.True(cancellation.Boundary.IsCancellationRequested);
        Assert.False(cancellation.IsAborted);
        cancellation.Cancel(TimeSpan.Zero);
        Assert.True(cancellation.IsAborted);
    }

    [Fact]
    public void ACancelEndsARendezvousWhosePeerNeverConnectsAndFreesItsPort()
    {
        int port = FreePort.Next();
        // The peer's port takes connections into its backlog and never answers: rank 0's dial reaching it shows the
        // rendezvous is under way and waiting, which is when the cancel must end it.
        var silentPeer = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        silentPeer.Start();
        try
        {
            int absent = ((IPEndPoint)silentPeer.LocalEndpoint).Port;
            var rendezvous = new TcpRendezvous("job", 3, Key, 0, 2, new IPEndPoint(IPAddress.Loopback, port));
            using var cts = new CancellationTokenSource();
            var connect = Task.Run(() => RunCancellation.ConnectRing(rendezvous, [$"127.0.0.1:{port}", $"127.0.0.1:{absent}"],
                new TcpCollectiveOptions { Timeout = TimeSpan.FromMinutes(5) }, cts.Token));
            Assert.True(SpinWait.SpinUntil(() => silentPeer.Pending() || connect.IsCompleted, TimeSpan.FromSeconds(60)), "rank 0 never dialled its peer");
            Assert.False(connect.IsCompleted, $"the rendezvous ended before the cancel: {connect.Exception}");
            cts.Cancel();
            Assert.True(((IAsyncResult)connect).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(60)), "the rendezvous ignored the cancellation");
            Assert.IsAssignableFrom<OperationCanceledException>(connect.Exception?.InnerException);
            using var next = new TcpRendezvous("job", 4, Key, 0, 2, new IPEndPoint(IPAddress.Loopback, port)); // the next generation binds the same port
            Assert.Equal(port, next.LocalEndpoint.Port);
        }
        finally { silentPeer.Stop(); }
    }

    static readonly byte[] Key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
}
