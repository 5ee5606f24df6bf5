// The neighbour copies and the live reshard over a real tcp ring (ranks are threads of this process), in bf16 so the
// fp32 master rows travel too: dp 4 ZeRO-1 keeps its copies, loses old ranks 1 and 3 (not adjacent: each one's shard
// survives in its neighbour's copy), and old ranks 0 and 2 with a spare that holds nothing reshard onto dp 3. Every
// new rank's moments and master rows equal, bit for bit, the rows of one whole optimizer state, and the spare gets
// the weights.
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

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

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void UnderZero3EveryNewRankGetsItsParameterRowsFromTheSurvivorsRowsAndTheLostRanksCopy(ScalarType dtype)
    {
        // ---- A whole model and optimizer with distinct values; four ZeRO-3 ranks each hold only their rows of both ----
        var options = new TrainingOptions { Zero = 3 };
        DeepSeekForCausalLM NewModel()
        {
            var m = DeepSeekForCausalLM.FromSeed(Config, 5);
            m.to(dtype);
            return m;
        }
        using var wholeModel = NewModel();
        using var whole = Trainer.CreateOptimizer(wholeModel, options);
        var generator = new Generator(3);
        using (no_grad())
            foreach (var (_, t) in whole.StateTensors()) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
        var wholeState = whole.StateTensors().ToDictionary(kv => kv.Key, kv => kv.Value);
        // In bf16 AdamW's update writes each parameter as its master rounded: the whole model is that here too.
        if (dtype == ScalarType.BFloat16)
            using (no_grad()) foreach (var s in whole.Slots) s.Param.copy_(s.Master!);
        var old = Enumerable.Range(0, 4).Select(r =>
        {
            var model = NewModel();
            var optimizer = Trainer.CreateOptimizer(model, options, r, 4);
            optimizer.LoadStateTensors(wholeState, "the whole state");
            optimizer.StepCount = 17;
            // Rank r holds its rows of every parameter (a ZeRO-3 rank's live state); the other rows are NaN, never to be read.
            using (no_grad())
                foreach (var (s, w) in optimizer.Slots.Zip(whole.Slots))
                {
                    s.Param.fill_(double.NaN);
                    using var mine = s.Own(s.Param);
                    using var rows = s.Own(w.Param);
                    mine.copy_(rows);
                }
            return new ReplicaState { JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = r, ZeroShards = 4, Step = 5, Lineage = 77, ShardedParameters = true };
        }).ToArray();
        try
        {
            Run(4, c => LiveShards.Refresh(c, old[c.Rank]));
            // fp32 copies carry the neighbour's parameter rows beside its moments; bf16 copies its master rows instead.
            long moments = 2 * whole.Slots.Sum(s => s.ExpAvg.numel());
            Assert.InRange(old.Sum(s => s.Neighbour!.Words.numel()), 1.49 * moments, 1.51 * moments);

            // ---- Old rank 1 is gone: old 0, 2, 3 are new ranks 0, 1, 2 of dp 3 ----
            ReplicaState[] survivors = [old[0], old[2], old[3]];
            var targets = Run(3, c =>
            {
                var held = survivors[c.Rank];
                var (cover, why) = LiveShards.Cover(LiveShards.Exchange(c, held), step: 5, source: 0, dp: 3);
                if (cover is null) throw new InvalidOperationException(why);
                var target = new ReplicaState
                {
                    JobId = "j", Fingerprint = "f", Model = held.Model, Optimizer = Trainer.CreateOptimizer(held.Model, options, c.Rank, 3), ZeroShard = c.Rank, ZeroShards = 3,
                    ShardedParameters = true,
                };
                LiveShards.Reshard(c, cover, held, target);
                return target;
            });
            foreach (var target in targets)
            {
                Assert.Equal((5L, 17L), (target.Step, target.Optimizer.StepCount));
                foreach (var (s, w) in target.Optimizer.Slots.Zip(whole.Slots))
                {
                    using var expected = s.Own(w.Param);
                    using var actual = s.Own(s.Param);
                    Assert.True(Same(expected, actual), $"{s.Name}: rows [{s.RowStart}, +{s.RowCount}) of the parameter differ from the whole model's");
                    var moment = wholeState[$"optimizer.{s.Name}.exp_avg"];
                    using var momentRows = s.RowCount is { } n && moment.dim() > 0 ? moment.narrow(0, s.RowStart, n) : moment.alias();
                    Assert.True(Same(momentRows, s.ExpAvg), $"{s.Name}.exp_avg differs from the whole state's rows");
                }
                target.Optimizer.Dispose();
            }
        }
        finally
        {
            foreach (var s in old) s.Dispose();
        }
    }

    /// <summary>Same shape, dtype and values (no NaN in these states).</summary>
    internal static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();
}
