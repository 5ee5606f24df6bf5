// The job spec's parallel.overlapGradientReduction, from its JSON through the worker's plan to the trainer it builds: on,
// a dp 2 trainer over a real tcp ring all-reduces buckets during the backward; absent, none.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public class OverlapSwitchTests
{
    const string Spec = """{"modelPreset": "tiny", "dataset": "d", "globalBatch": 4, "microBatch": 2, "seqLen": 16, "steps": 2, "minWorkers": 2, "maxWorkers": 2, "parallel": {"dp": 2PLAN}}""";

    /// <summary>The options the worker trains with for the spec (as RunFormation hands plan.Options to the Trainer), and what one dp 2 step did.</summary>
    static (TrainingOptions Options, bool Overlaps, long DuringBackward)[] TrainOneStep(string plan)
    {
        var spec = JobSpecJson.Deserialize(Spec.Replace("PLAN", plan), "the test spec");
        Assert.Empty(spec.Validate());
        var (config, options) = JobPlan.Map(spec, vocabSize: 101, eosTokenId: 3);
        var rng = new Random(1);
        var data = new TokenDataset([.. Enumerable.Range(0, 17 * 16).Select(_ => rng.Next(101))], options.SeqLen);
        return TcpRanks.Run(2, ring =>
        {
            using var model = DeepSeekForCausalLM.FromSeed(config, 7);
            // Buckets of 4 KiB: each signalled group is one, whatever the model's size (the worker's are 25 MiB).
            using var trainer = new Trainer(model, data, null, options, CPU, 1e11, ring.Rank, 2, new BucketedGradientReducer(ring, 4 << 10));
            trainer.TrainStep();
            return (options, trainer.OverlapsReduction, trainer.OverlappedBuckets.DuringBackward);
        });
    }

    [Fact]
    public void TheSpecsOverlapSwitchReachesTheTrainerWhichAllReducesBucketsDuringTheBackward()
    {
        foreach (var (options, overlaps, during) in TrainOneStep(""", "overlapGradientReduction": true"""))
        {
            Assert.True(options.OverlapGradientReduction);
            Assert.True(overlaps, "the trainer built from the plan does not overlap its all-reduce");
            Assert.True(during > 0, "no bucket was all-reduced during the backward");
        }
        foreach (var (options, overlaps, during) in TrainOneStep(""))
            Assert.Equal((false, false, 0L), (options.OverlapGradientReduction, overlaps, during));
    }
}
