// The state the ep live-reshard tests (LiveShardsExpertTests, LiveShardsExpertZero3Tests) move between ranks: one whole
// model and optimizer of distinct values, its replicas as dp x ep 2 ranks hold them, and the reshard each new rank runs.
// Not the assertions: what a new rank must hold differs by ZeRO stage, so each test class keeps its own.
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

namespace DeepSeekCluster.GpuWorker.Tests;

/// <summary>One whole model and optimizer state with distinct values everywhere, routing biases included (in bf16 the weights are the master rows rounded, as AdamW writes them).</summary>
sealed class WholeExpertState : IDisposable
{
    // 101 vocabulary rows split unevenly over 4 shards; 8 routed experts, 4 per expert shard.
    public static readonly DeepSeekConfig Config = DeepSeekConfig.Preset("tiny") with { VocabSize = 101 };

    public readonly DeepSeekForCausalLM Model;
    public readonly Training.Optim.AdamW Optimizer;
    public readonly Dictionary<string, Tensor> State, Weights;

    public WholeExpertState(ScalarType dtype)
    {
        Model = DeepSeekForCausalLM.FromSeed(Config, 5);
        var generator = new Generator(3);
        Model.to(dtype);
        Optimizer = Trainer.CreateOptimizer(Model, new TrainingOptions());
        using (no_grad())
        {
            foreach (var (_, t) in CheckpointTensors.Collect(Model, null)) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
            foreach (var (_, t) in Optimizer.StateTensors()) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
            if (dtype == ScalarType.BFloat16) foreach (var s in Optimizer.Slots) s.Param.copy_(s.Master!);
        }
        State = Optimizer.StateTensors().ToDictionary(kv => kv.Key, kv => kv.Value);
        Weights = CheckpointTensors.Collect(Model, null).ToDictionary(kv => kv.Key, kv => kv.Value);
        Assert.Contains(Weights.Keys, k => k.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
    }

    public static ParallelLayout Layout(int dp, int zero) => ParallelLayout.Even(dp, 1, Config.NumHiddenLayers).WithShards(2, zero, Config.NRoutedExperts);

    static TrainingOptions Options(int zero) => new() { Zero = zero, Ep = 2 };

    /// <summary>
    /// Replica <paramref name="replica"/> of dp x ep 2 at step 5: its experts, every weight of them, and its rows of the whole
    /// optimizer state (under ZeRO-3 its parameters are still whole: a test leaves only the replica's own rows).
    /// </summary>
    public ReplicaState Replica(int replica, int dp, int zero, ScalarType dtype)
    {
        var model = DeepSeekForCausalLM.FromSeed(Config, 5);
        ExpertParallel.ShardModel(model, Layout(dp, zero), replica);
        model.to(dtype);
        using (no_grad()) foreach (var (name, t) in CheckpointTensors.Collect(model, null)) t.copy_(Weights[name]);
        var optimizer = Trainer.CreateOptimizer(model, Options(zero), replica, dp);
        optimizer.LoadStateTensors(State, "the whole state");
        optimizer.StepCount = 17;
        return new ReplicaState
        {
            JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = replica, ZeroShards = dp, Ep = 2, Step = 5, Lineage = 77,
            ShardedParameters = zero >= 3,
        };
    }

    /// <summary>
    /// The reshard of <paramref name="survivors"/> (null: a spare) onto dp <paramref name="dp"/> x ep 2: a rank keeps its model
    /// where its expert shard stays (Resumption.ReshardLive), else builds a whole one of another seed that the reshard overwrites.
    /// </summary>
    public static (ShardCover Cover, ReplicaState Target)[] Reshard(ReplicaState?[] survivors, int dp, int zero, ScalarType dtype) => Run(dp, c =>
    {
        var held = survivors[c.Rank];
        var (cover, why) = LiveShards.Cover(LiveShards.Exchange(c, held), step: 5, source: 0, dp: dp, ep: 2, zero: zero);
        if (cover is null) throw new InvalidOperationException(why);
        bool keep = held is not null && held.ZeroShard % 2 == c.Rank % 2;
        DeepSeekForCausalLM model;
        if (keep) model = held!.Model;
        else
        {
            model = DeepSeekForCausalLM.FromSeed(Config, 99);
            ExpertParallel.ShardModel(model, Layout(dp, zero), c.Rank);
            model.to(dtype);
        }
        var optimizer = Trainer.CreateOptimizer(model, Options(zero), c.Rank, dp);
        var target = new ReplicaState
        {
            JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = c.Rank, ZeroShards = dp, Ep = 2, ShardedParameters = zero >= 3,
        };
        LiveShards.Reshard(c, cover, held, target);
        return (cover, target);
    });

    public void Dispose()
    {
        Optimizer.Dispose();
        Model.Dispose();
    }
}
