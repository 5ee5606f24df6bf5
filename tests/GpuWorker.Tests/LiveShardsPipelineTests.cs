// parallel.redundancy inside pipeline stages over real tcp rings (ranks are threads of this process; each stage's replicas
// form its own ring, as RunFormation connects them), in float64 and in bf16 (fp32 master rows beside bf16 weights).
// pp 2 x dp 3 with ZeRO-1, -2 or -3: each stage's replicas shard the stage's optimizer state (ZeRO-3: and its parameters)
// and each keeps its ring neighbour's shard of it. Old rank 4 (stage 1, replica 1) is lost; onto pp 2 x dp 2 stage 0
// keeps old replicas 0 and 1 (old replica 2's shard from replica 1's copy) and stage 1 old replicas 2 and 0 (the lost
// shard from replica 0's copy). Or a spare takes its place (pp 2 x dp 3 again) and gets the stage's weights and its rows.
// Under pp 2 x dp 2 x ep 2 (zero 1 or 2) a spare in stage 1 takes the lost rank's experts from the copy, or, when the
// lost rank is the stage's replica 0, the survivor moves to expert shard 0 beside the spare. Every new rank's weights,
// routing biases, both moments, master rows and step counters equal, bit for bit, one whole state's (in bf16 each
// rank's weights are its master rows rounded); each copy's bytes are the planner's. Without the copies the cover names
// the lost shard.
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using TorchSharp;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.LiveShardsReshardTests;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

namespace DeepSeekCluster.GpuWorker.Tests;

public class LiveShardsPipelineTests
{
    // 101 vocabulary rows split unevenly over 3 and 2 replicas; tiny's 4 layers are 2 per stage, the MTP block on stage 1.
    static readonly DeepSeekConfig Config = DeepSeekConfig.Preset("tiny") with { VocabSize = 101 };
    const int Pp = 2;

    static ParallelLayout Layout(int dp, int zero, int ep = 1) => ParallelLayout.Even(dp, Pp, Config.NumHiddenLayers).WithShards(ep, zero, Config.NRoutedExperts);

    /// <summary>
    /// One whole model and optimizer state with distinct values everywhere, routing biases included: float64, or bf16 with
    /// fp32 master rows that bf16 cannot hold (the weights are the masters rounded, as AdamW writes them).
    /// </summary>
    sealed class Whole : IDisposable
    {
        public readonly DeepSeekForCausalLM Model;
        public readonly Training.Optim.AdamW Optimizer;
        public readonly Dictionary<string, Tensor> State, Weights;
        public readonly ScalarType Dtype;

        public Whole(ScalarType dtype = ScalarType.Float64)
        {
            Dtype = dtype;
            Model = DeepSeekForCausalLM.FromSeed(Config, 5);
            Model.to(dtype);
            var generator = new Generator(3);
            Optimizer = Trainer.CreateOptimizer(Model, new TrainingOptions());
            using (no_grad())
            {
                foreach (var (_, t) in CheckpointTensors.Collect(Model, null)) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
                foreach (var (_, t) in Optimizer.StateTensors()) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
                if (dtype == ScalarType.BFloat16) foreach (var s in Optimizer.Slots) s.Param.copy_(s.Master!);
            }
            State = Optimizer.StateTensors().ToDictionary(kv => kv.Key, kv => kv.Value);
            Weights = CheckpointTensors.Collect(Model, null).ToDictionary(kv => kv.Key, kv => kv.Value);
            Assert.Equal(dtype == ScalarType.BFloat16, State.Keys.Any(k => k.EndsWith(".master", StringComparison.Ordinal)));
        }

        /// <summary>Stage <paramref name="stage"/>, replica <paramref name="replica"/> of pp 2 x dp at step 5: the stage's weights and its rows of the whole state.</summary>
        public ReplicaState Replica(int stage, int replica, int dp, int zero, int ep = 1)
        {
            var model = DeepSeekForCausalLM.FromSeed(Config, 5);
            var layout = Layout(dp, zero, ep);
            if (ep > 1) ExpertParallel.ShardModel(model, layout, layout.Rank(stage, replica));
            model.to(Dtype);
            using (no_grad()) foreach (var (name, t) in CheckpointTensors.Collect(model, null)) t.copy_(Weights[name]);
            var pipelineStage = new PipelineStage(model, layout, stage);
            var optimizer = PipelineTrainer.CreateOptimizer(pipelineStage, new TrainingOptions { Zero = zero, Ep = ep }, replica, dp);
            optimizer.LoadStateTensors(State, "the whole state");
            optimizer.StepCount = 17;
            // ZeRO-3: the replica holds its rows of each of the stage's parameters (a trainer's between steps, made whole-shaped
            // when it ends); the other rows are NaN, never to be read.
            if (zero >= 3)
                using (no_grad())
                    foreach (var slot in optimizer.Slots)
                    {
                        using var rows = slot.Own(slot.Param).clone();
                        slot.Param.fill_(double.NaN);
                        using var mine = slot.Own(slot.Param);
                        mine.copy_(rows);
                    }
            return new ReplicaState
            {
                JobId = "j", Fingerprint = $"f/stage {stage}", Model = model, Stage = pipelineStage, Optimizer = optimizer, ZeroShard = replica, ZeroShards = dp,
                Ep = ep, Step = 5, Lineage = 77, ShardedParameters = zero >= 3,
            };
        }

        /// <summary>
        /// The stage a new rank builds when it keeps no model of its stage (a spare, or a survivor whose replica moved to the
        /// other expert shard), as Resumption does: from another seed (so every weight must come from the ring), its expert
        /// shard's experts alone, in the state's dtype.
        /// </summary>
        public PipelineStage OtherSeedsStage(int stage, int replica, int dp, int zero, int ep = 1)
        {
            var model = DeepSeekForCausalLM.FromSeed(Config, 99);
            var layout = Layout(dp, zero, ep);
            if (ep > 1) ExpertParallel.ShardModel(model, layout, layout.Rank(stage, replica));
            model.to(Dtype);
            return new PipelineStage(model, layout, stage);
        }

        /// <summary>The bytes the planner predicts for rank <paramref name="rank"/>'s neighbour copy in this state's precision.</summary>
        public long PlannedCopyBytes(ParallelLayout layout, int rank)
        {
            var inputs = new MemoryInputs(Dtype == ScalarType.BFloat16 ? "bf16" : "fp64", "none", 1, 8);
            var (without, with) = (MemoryPlanner.Predict(Config, layout, rank, inputs), MemoryPlanner.Predict(Config, layout, rank, inputs with { Redundancy = true }));
            return with.Optimizer + with.Parameters - without.Optimizer - without.Parameters;
        }

        public void Dispose()
        {
            Optimizer.Dispose();
            Model.Dispose();
        }
    }

    /// <summary>pp 2 x dp 3 at step 5: every stage's three replicas, [stage][replica].</summary>
    static ReplicaState[][] OldStages(Whole whole, int zero) =>
        [.. Enumerable.Range(0, Pp).Select(s => Enumerable.Range(0, 3).Select(d => whole.Replica(s, d, 3, zero)).ToArray())];

    /// <summary>
    /// One stage's ring of the new layout (dp <paramref name="dp"/>): each member's held state (null: holds nothing) covered
    /// and resharded onto its rank; the cover, and every rank's new state. A member keeps its stage's model when it holds
    /// one of the expert shard its new rank holds (Resumption.ReshardLive); new rank r that does not gets
    /// <paramref name="build"/>(r), a stage of a model of its own.
    /// </summary>
    static (ShardCover Cover, ReplicaState[] Targets) Reshard(ReplicaState?[] members, int stage, int dp, int zero, Func<int, PipelineStage>? build = null, int ep = 1)
    {
        var ranks = Run(dp, c =>
        {
            var held = members[c.Rank];
            var (cover, why) = LiveShards.Cover(LiveShards.Exchange(c, held), step: 5, source: 0, dp: dp, ep: ep, zero: zero);
            if (cover is null) throw new InvalidOperationException($"stage {stage}: {why}");
            var keep = held is not null && held.ZeroShard % ep == c.Rank % ep ? held.Stage! : build!(c.Rank);
            var target = new ReplicaState
            {
                JobId = "j", Fingerprint = $"f/stage {stage}", Model = keep.Model, Stage = keep,
                Optimizer = PipelineTrainer.CreateOptimizer(keep, new TrainingOptions { Zero = zero, Ep = ep }, c.Rank, dp), ZeroShard = c.Rank, ZeroShards = dp,
                Ep = ep, ShardedParameters = zero >= 3,
            };
            Assert.True(LiveShards.Reshard(c, cover, held, target) > 0);
            return (Cover: cover, Target: target);
        });
        return (ranks[0].Cover, [.. ranks.Select(r => r.Target)]);
    }

    /// <summary>
    /// Every rank of <paramref name="stage"/>: the stage's weights and routing biases (under ZeRO-3 the rank's rows of its
    /// parameters) and its rows of both moments and of the master are the whole state's, bit for bit; in bf16 its rows of
    /// each weight are its master rows rounded.
    /// </summary>
    static void AssertWhole(Whole whole, int stage, ReplicaState[] targets)
    {
        var owner = new ShardingPlan(Layout(2, 1), []);
        foreach (var target in targets)
        {
            Assert.Equal((5L, 77L, 17L), (target.Step, target.Lineage, target.Optimizer.StepCount));
            var weights = CheckpointTensors.Collect(target.Model, null).Where(kv => owner.StageOf(kv.Key) == stage).ToList();
            Assert.Contains(weights, kv => kv.Key == (stage == 0 ? "model.embed_tokens.weight" : "lm_head.weight"));
            Assert.Contains(weights, kv => kv.Key.EndsWith(".mlp.gate.e_score_correction_bias", StringComparison.Ordinal));
            var rowsOnly = target.ShardedParameters ? target.Optimizer.Slots.ToDictionary(s => s.Name) : [];
            foreach (var (name, t) in weights)
            {
                if (rowsOnly.TryGetValue(name, out var slot))
                {
                    using var expected = slot.Own(whole.Weights[name]);
                    using var actual = slot.Own(t);
                    Assert.True(Same(expected, actual), $"stage {stage} replica {target.ZeroShard}: rows [{slot.RowStart}, +{slot.RowCount}) of {name} differ from the whole model's");
                }
                else Assert.True(Same(whole.Weights[name], t), $"stage {stage} replica {target.ZeroShard}: {name} differs from the whole model's");
            }
            int checkedTensors = 0;
            foreach (var s in target.Optimizer.Slots)
            {
                var kinds = new[] { ("exp_avg", s.ExpAvg), ("exp_avg_sq", s.ExpAvgSq), ("master", s.Master) };
                Assert.Equal(whole.Dtype == ScalarType.BFloat16, s.Master is not null);
                foreach (var (kind, t) in kinds)
                {
                    if (t is null) continue;
                    var all = whole.State[$"optimizer.{s.Name}.{kind}"];
                    using var rows = s.RowCount is { } n && all.dim() > 0 ? all.narrow(0, s.RowStart, n) : all.alias();
                    Assert.True(Same(rows, t), $"stage {stage} replica {target.ZeroShard}: {s.Name}.{kind} rows [{s.RowStart}, +{s.RowCount}) differ from the whole state's");
                    checkedTensors++;
                }
                if (s.Master is { } master)
                {
                    using var weightRows = s.Own(s.Param);
                    using var rounded = master.to(weightRows.dtype);
                    Assert.True(Same(rounded, weightRows.reshape(rounded.shape)), $"stage {stage} replica {target.ZeroShard}: {s.Name}'s weights are not its master rows rounded");
                }
            }
            // Every parameter the stage owns has its moments (and in bf16 its master rows) here, and no other stage's.
            Assert.Equal((whole.Dtype == ScalarType.BFloat16 ? 3 : 2) * target.Stage!.Parameters.Count, checkedTensors);
        }
    }

    static void Dispose(IEnumerable<ReplicaState> states, bool models)
    {
        foreach (var s in states)
        {
            if (models) s.Dispose();
            else s.Optimizer.Dispose();
        }
    }

    [Theory]
    [InlineData(1, ScalarType.Float64)]
    [InlineData(2, ScalarType.Float64)]
    [InlineData(3, ScalarType.Float64)]
    [InlineData(1, ScalarType.BFloat16)]
    [InlineData(3, ScalarType.BFloat16)]
    public void EachStageReshardsTheLostRanksShardFromItsNeighboursCopyOntoDp2AndHoldsTheWholeStatesRows(int zero, ScalarType dtype)
    {
        using var whole = new Whole(dtype);
        var old = OldStages(whole, zero);
        var targets = new List<ReplicaState>();
        try
        {
            // ---- Each stage's ring keeps its neighbours' shards of that stage's state: the planner's bytes ----
            var layout = Layout(3, zero);
            for (int s = 0; s < Pp; s++)
            {
                var stage = old[s];
                Run(3, c => LiveShards.Refresh(c, stage[c.Rank]));
                for (int d = 0; d < 3; d++)
                {
                    var copy = stage[d].Neighbour!;
                    Assert.Equal(((d + 1) % 3, 5L), (copy.Shard, copy.Step));
                    // The planner's count for rank stage·3 + d: its neighbour's ZeRO shard of the stage, both moments in float64
                    // (ZeRO-3: and its parameter rows, there being no fp32 master); in bf16 both moments and the master rows in
                    // fp32 (ZeRO-3's parameter rows are the master rows rounded: not copied).
                    var (state, rows) = MemoryPlanner.NeighbourElements(Config, layout, layout.Rank(s, d));
                    long expected = dtype == ScalarType.BFloat16 ? state * 3 * sizeof(float) : (state * 2 + (zero >= 3 ? rows : 0)) * sizeof(double);
                    if (zero >= 3) Assert.Equal(state, rows);
                    Assert.Equal(expected, whole.PlannedCopyBytes(layout, layout.Rank(s, d)));
                    Assert.InRange(copy.Words.numel() * copy.Words.element_size(), expected * 0.99, expected * 1.01);
                }
            }

            // ---- Old rank 4 (stage 1, replica 1) is gone; pp 2 x dp 2 keeps old replicas 0, 1 of stage 0 and 2, 0 of stage 1 ----
            var (cover0, stage0) = Reshard([old[0][0], old[0][1]], 0, 2, zero);
            targets.AddRange(stage0);
            var (cover1, stage1) = Reshard([old[1][2], old[1][0]], 1, 2, zero);
            targets.AddRange(stage1);
            // Stage 0: shard 2 (old replica 2, left out) from old replica 1 = new rank 1's copy; stage 1: shard 1 (the lost
            // rank's) from old replica 0 = new rank 1's copy.
            Assert.Equal([0, 1, 1], cover0.Holders);
            Assert.Equal([false, false, true], cover0.FromCopy);
            Assert.Equal([1, 1, 0], cover1.Holders);
            Assert.Equal([false, true, false], cover1.FromCopy);
            Assert.False(cover1.InPlace);
            AssertWhole(whole, 0, stage0);
            AssertWhole(whole, 1, stage1);
        }
        finally
        {
            Dispose(targets, models: false);
            Dispose(old.SelectMany(s => s), models: true);
        }
    }

    [Theory]
    [InlineData(ScalarType.Float64)]
    [InlineData(ScalarType.BFloat16)]
    public void ASpareTakingTheLostRanksPlaceGetsItsStagesWeightsAndTheLostShardFromTheNeighboursCopy(ScalarType dtype)
    {
        using var whole = new Whole(dtype);
        var old = OldStages(whole, 1);
        // The spare's stage-1 model is another seed's: the weights must come from the survivors.
        var spare = whole.OtherSeedsStage(1, 1, 3, 1);
        var targets = Array.Empty<ReplicaState>();
        try
        {
            Assert.False(Same(whole.Weights["lm_head.weight"], CheckpointTensors.Collect(spare.Model, null).Single(kv => kv.Key == "lm_head.weight").Value));
            Run(3, c => LiveShards.Refresh(c, old[1][c.Rank]));
            (var cover, targets) = Reshard([old[1][0], null, old[1][2]], 1, 3, 1, _ => spare);
            Assert.Equal([0, 0, 2], cover.Holders);
            Assert.Equal([false, true, false], cover.FromCopy);
            Assert.Equal([true, false, true], cover.Keeps);
            Assert.Same(spare.Model, targets[1].Model);
            AssertWhole(whole, 1, targets);
        }
        finally
        {
            Dispose(targets, models: false);
            spare.Model.Dispose();
            Dispose(old.SelectMany(s => s), models: true);
        }
    }

    /// <summary>
    /// pp 2 x dp 2 x ep 2 at step 5, every stage's ring refreshed: in each stage replica d holds expert shard d alone, so its
    /// experts' rows and weights are held once, and its replicated ZeRO rows too; the copy keeps both. Each copy's bytes
    /// are the planner's; under zero 2 each copy is, word for word, the copy the same replicas keep under zero 1.
    /// </summary>
    static ReplicaState[][] OldExpertStages(Whole whole, int zero)
    {
        var layout = Layout(2, zero, ep: 2);
        var old = Enumerable.Range(0, Pp).Select(s => Enumerable.Range(0, 2).Select(d => whole.Replica(s, d, 2, zero, ep: 2)).ToArray()).ToArray();
        for (int s = 0; s < Pp; s++)
        {
            var stage = old[s];
            Run(2, c => LiveShards.Refresh(c, stage[c.Rank]));
            for (int d = 0; d < 2; d++)
            {
                var copy = stage[d].Neighbour!;
                Assert.Equal(((d + 1) % 2, 5L), (copy.Shard, copy.Step));
                long expected = whole.PlannedCopyBytes(layout, layout.Rank(s, d));
                Assert.InRange(copy.Words.numel() * copy.Words.element_size(), expected * 0.99, expected * 1.01);
            }
            if (zero != 2) continue;
            // ZeRO-2 shards the gradients too, which live only inside a step: between steps (what a copy and a reshard see)
            // each replica holds zero 1's rows of zero 1's state.
            var zero1 = Enumerable.Range(0, 2).Select(d => whole.Replica(s, d, 2, 1, ep: 2)).ToArray();
            try
            {
                Run(2, c => LiveShards.Refresh(c, zero1[c.Rank]));
                for (int d = 0; d < 2; d++)
                {
                    Assert.Equal(zero1[d].Optimizer.Slots.Select(x => (x.Name, x.RowStart, x.RowCount)), stage[d].Optimizer.Slots.Select(x => (x.Name, x.RowStart, x.RowCount)));
                    Assert.True(Same(zero1[d].Neighbour!.Words, stage[d].Neighbour!.Words), $"stage {s} replica {d}: the zero 2 copy is not the zero 1 copy");
                }
                Assert.Equal(MemoryPlanner.NeighbourElements(Config, Layout(2, 1, ep: 2), layout.Rank(s, 0)), MemoryPlanner.NeighbourElements(Config, layout, layout.Rank(s, 0)));
            }
            finally
            {
                foreach (var r in zero1) r.Dispose();
            }
        }
        return old;
    }

    [Theory]
    [InlineData(1, ScalarType.Float64)]
    [InlineData(2, ScalarType.Float64)]
    [InlineData(2, ScalarType.BFloat16)]
    public void UnderEp2ASpareInAStageTakesTheLostRanksExpertsAndRowsFromTheNeighboursCopy(int zero, ScalarType dtype)
    {
        using var whole = new Whole(dtype);
        var old = OldExpertStages(whole, zero);
        // A spare holding another seed's expert shard 1 of stage 1.
        var spare = whole.OtherSeedsStage(1, 1, 2, zero, ep: 2);
        var targets = Array.Empty<ReplicaState>();
        try
        {
            Assert.Contains(CheckpointTensors.Collect(spare.Model, null), kv => kv.Key.Contains(".mlp.experts.4.", StringComparison.Ordinal));
            // ---- Stage 1's replica 1 is lost; the spare takes its place ----
            (var cover, targets) = Reshard([old[1][0], null], 1, 2, zero, _ => spare, ep: 2);
            // Pieces: the replicated rows of shards 0 and 1, then expert shards 0 and 1 (one part each).
            Assert.Equal([0, 0, 0, 0], cover.Holders);
            Assert.Equal([false, true, false, true], cover.FromCopy);
            Assert.Equal([true, false], cover.Keeps);
            Assert.Same(spare.Model, targets[1].Model);
            AssertWhole(whole, 1, targets);
        }
        finally
        {
            Dispose(targets, models: false);
            spare.Model.Dispose();
            Dispose(old.SelectMany(s => s), models: true);
        }
    }

    [Fact]
    public void UnderEp2Zero2InBf16LosingAStagesReplica0MovesTheSurvivorToExpertShard0WhileItSendsTheWeightsItHeld()
    {
        const int zero = 2;
        using var whole = new Whole(ScalarType.BFloat16);
        var old = OldExpertStages(whole, zero);
        // Stage 1 keeps its survivor first (LiveMembers.ByStage): old replica 1 becomes replica 0, which holds expert shard 0,
        // and builds a model for it; the spare is replica 1. Both models are another seed's.
        var built = Enumerable.Range(0, 2).Select(d => whole.OtherSeedsStage(1, d, 2, zero, ep: 2)).ToArray();
        var targets = Array.Empty<ReplicaState>();
        try
        {
            (var cover, targets) = Reshard([old[1][1], null], 1, 2, zero, r => built[r], ep: 2);
            // The survivor holds shard 1's replicated rows and expert shard 1 itself, and shard 0's of both in its copy; it is
            // the source of the replicated weights though its new model holds none of its old ones.
            Assert.Equal([0, 0, 0, 0], cover.Holders);
            Assert.Equal([true, false, true, false], cover.FromCopy);
            Assert.Equal([false, false], cover.Keeps);
            Assert.Same(built[0].Model, targets[0].Model);
            Assert.Same(built[1].Model, targets[1].Model);
            AssertWhole(whole, 1, targets);
        }
        finally
        {
            Dispose(targets, models: false);
            foreach (var b in built) b.Model.Dispose();
            Dispose(old.SelectMany(s => s), models: true);
        }
    }

    [Fact]
    public void WithoutTheNeighbourCopiesTheCoverNamesEachStagesLostShard()
    {
        using var whole = new Whole();
        var old = OldStages(whole, 1);
        try
        {
            // No refresh: no rank holds a copy. The same survivors as above, each stage's ring asking for its cover.
            string Why(ReplicaState[] members) => Run(2, c => LiveShards.Cover(LiveShards.Exchange(c, members[c.Rank]), step: 5, source: 0, dp: 2, zero: 1))
                .Select(r => { Assert.Null(r.Cover); return r.Why; }).Distinct().Single();
            Assert.Equal("shard 2 of 3 at step 5 is held by no survivor (its rank and the neighbour keeping its copy are both gone)", Why([old[0][0], old[0][1]]));
            Assert.Equal("shard 1 of 3 at step 5 is held by no survivor (its rank and the neighbour keeping its copy are both gone)", Why([old[1][2], old[1][0]]));
        }
        finally
        {
            Dispose(old.SelectMany(s => s), models: true);
        }
    }
}
