// The neighbour copies and the live reshard over a real tcp ring (ranks are threads of this process), in bf16 so the
// fp32 master rows travel too: dp 4 ZeRO-1 keeps its copies, loses old ranks 1 and 3 (not adjacent: each one's shard
// survives in its neighbour's copy), and old ranks 0 and 2 with a spare that holds nothing reshard onto dp 3. Every
// new rank's moments and master rows equal, bit for bit, the rows of one whole optimizer state, and the spare gets
// the weights.
using System.Net;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public class LiveShardsReshardTests
{
    // 101 vocabulary rows split unevenly over 4 and over 3 shards.
    static readonly DeepSeekConfig Config = DeepSeekConfig.Preset("tiny") with { VocabSize = 101 };
    static readonly TrainingOptions Options = new() { Zero = 1 };
    static readonly byte[] Key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);

    static DeepSeekForCausalLM Model(int seed)
    {
        var model = DeepSeekForCausalLM.FromSeed(Config, seed);
        model.to(ScalarType.BFloat16); // AdamW keeps fp32 master rows beside the moments
        return model;
    }

    [Fact]
    public void TwoNonAdjacentLostShardsComeFromTheirNeighboursCopiesAndEveryRankOfDp3HoldsTheWholeStatesRows()
    {
        // ---- One whole optimizer state with distinct values everywhere, and its four ZeRO shards ----
        using var wholeModel = Model(5);
        using var whole = Trainer.CreateOptimizer(wholeModel, Options);
        var generator = new Generator(3);
        using (no_grad())
            foreach (var (_, t) in whole.StateTensors()) t.copy_(randn(t.shape, dtype: ScalarType.Float32, generator: generator));
        var wholeState = whole.StateTensors().ToDictionary(kv => kv.Key, kv => kv.Value);
        Assert.Contains(wholeState.Keys, k => k.EndsWith(".master", StringComparison.Ordinal));
        var old = Enumerable.Range(0, 4).Select(r =>
        {
            var model = Model(5);
            var optimizer = Trainer.CreateOptimizer(model, Options, r, 4);
            optimizer.LoadStateTensors(wholeState, "the whole state");
            optimizer.StepCount = 17;
            return new ReplicaState { JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = r, ZeroShards = 4, Step = 5, Lineage = 77 };
        }).ToArray();
        try
        {
            Run(4, c => LiveShards.Refresh(c, old[c.Rank]));
            Assert.All(old, s => Assert.Equal(5, s.Neighbour!.Step));

            // ---- Old ranks 1 and 3 are gone; old 0 and 2 are new ranks 0 and 1, a spare with other weights is rank 2 ----
            using var spareModel = Model(99);
            ReplicaState?[] survivors = [old[0], old[2], null];
            var outcomes = Run(3, c =>
            {
                var held = survivors[c.Rank];
                var (cover, why) = LiveShards.Cover(LiveShards.Exchange(c, held), step: 5, source: 0, dp: 3);
                if (cover is null) throw new InvalidOperationException(why);
                var model = held?.Model ?? spareModel;
                var target = new ReplicaState { JobId = "j", Fingerprint = "f", Model = model, Optimizer = Trainer.CreateOptimizer(model, Options, c.Rank, 3), ZeroShard = c.Rank, ZeroShards = 3 };
                long bytes = LiveShards.Reshard(c, cover, held, target);
                return (Cover: cover, Target: target, Bytes: bytes);
            });

            var cover = outcomes[0].Cover;
            Assert.Equal([0, 0, 1, 1], cover.Holders);
            Assert.Equal([false, true, false, true], cover.FromCopy);
            foreach (var (_, target, bytes) in outcomes)
            {
                Assert.Equal((5L, 77L, 17L), (target.Step, target.Lineage, target.Optimizer.StepCount));
                Assert.True(bytes > 0);
                int checkedTensors = 0;
                foreach (var s in target.Optimizer.Slots)
                    foreach (var (kind, t) in new[] { ("exp_avg", s.ExpAvg), ("exp_avg_sq", s.ExpAvgSq), ("master", s.Master!) })
                    {
                        var all = wholeState[$"optimizer.{s.Name}.{kind}"];
                        using var rows = s.RowCount is { } n && all.dim() > 0 ? all.narrow(0, s.RowStart, n) : all.alias();
                        Assert.True(Same(rows, t), $"{s.Name}.{kind} rows [{s.RowStart}, +{s.RowCount}) differ from the whole state's");
                        checkedTensors++;
                    }
                Assert.Equal(3 * whole.Slots.Count, checkedTensors);
            }
            // The spare's weights are the survivors' (bf16, bit for bit); they were another seed's before.
            var expected = CheckpointTensors.Collect(old[0].Model, null);
            var spare = CheckpointTensors.Collect(spareModel, null);
            Assert.All(expected.Zip(spare), p => Assert.True(Same(p.First.Value, p.Second.Value), $"{p.Second.Key} is not the survivors'"));
            foreach (var (_, target, _) in outcomes) target.Optimizer.Dispose();
        }
        finally
        {
            foreach (var s in old) s.Dispose();
        }
    }

    /// <summary>Same shape, dtype and values (no NaN in these states).</summary>
    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    /// <summary>W ranks as threads over real sockets; a rank that hangs past two minutes fails the test.</summary>
    static T[] Run<T>(int world, Func<TcpCollective, T> body)
    {
        var rendezvous = Enumerable.Range(0, world).Select(r => new TcpRendezvous("reshard-test", world, Key, r, world, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
        var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
        var tasks = rendezvous.Select(rv => Task.Factory.StartNew(() =>
        {
            using var collective = rv.Connect(endpoints, new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(60) });
            return body(collective);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        if (!Task.WaitAll(tasks, TimeSpan.FromMinutes(2))) throw new TimeoutException($"a rank of a world of {world} hung");
        return [.. tasks.Select(t => t.Result)];
    }
}
