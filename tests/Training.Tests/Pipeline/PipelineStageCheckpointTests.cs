// A stage resumes from a committed checkpoint of any layout: it reads only the tensors it owns, and a checkpoint of
// another model is refused before anything is touched (what a cluster worker of a pp > 1 job does on a re-formation).
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Pipeline;

public class PipelineStageCheckpointTests
{
    const int Vocab = 64;
    static DeepSeekConfig Config => DeepSeekConfig.Tiny(Vocab) with { HiddenSize = 32, IntermediateSize = 64, MoeIntermediateSize = 16, NumHiddenLayers = 4 };
    static readonly TrainingOptions Options = new() { SeqLen = 8, GlobalBatch = 4, MicroBatch = 2, Steps = 2, Lr = 1e-2, WarmupSteps = 1 };

    static DeepSeekForCausalLM NewModel(DeepSeekConfig config, int seed)
    {
        manual_seed(seed);
        return new DeepSeekForCausalLM(config).InitializeWeights();
    }

    /// <summary>A single-process state (weights and AdamW moments that are not zero) committed as a dp 1 × pp 1 checkpoint.</summary>
    static async Task<(DeepSeekForCausalLM Model, DeepSeekCluster.Training.Optim.AdamW Optimizer)> CommitSingleProcessState(FolderCheckpointStore store, string job, long step)
    {
        var model = NewModel(Config, 7);
        var optimizer = Trainer.CreateOptimizer(model, Options);
        using (no_grad())
            foreach (var s in optimizer.Slots) s.Param.grad = randn_like(s.Param);
        optimizer.Step(1e-2);
        var plan = new ShardingPlan(ParallelLayout.Even(1, 1, Config.NumHiddenLayers), CheckpointTensors.Catalog(CheckpointTensors.Collect(model, optimizer)));
        var file = ShardedCheckpointWriter.WriteRank(store, plan, 0, step, CheckpointTensors.Collect(model, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value));
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(job, plan, new CheckpointPosition(step, 1, step * Options.GlobalBatch, optimizer.StepCount),
                                                                 [file], Config.ToJson(), null));
        return (model, optimizer);
    }

    [Fact]
    public async Task EachStageLoadsExactlyItsTensorsOfASingleProcessCheckpoint()
    {
        string root = Path.Combine(Path.GetTempPath(), $"pp-stage-load-{Guid.NewGuid():N}");
        try
        {
            using var store = new FolderCheckpointStore(root, "stage-load");
            var (single, singleOptimizer) = await CommitSingleProcessState(store, "stage-load", 5);
            var expected = CheckpointTensors.Collect(single, singleOptimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            var layout = ParallelLayout.Even(1, 2, Config.NumHiddenLayers);
            var loadedNames = new List<string>();
            for (int s = 0; s < 2; s++)
            {
                // Fresh weights from another seed: every owned value must come from the checkpoint.
                var stage = new PipelineStage(NewModel(Config, 99), layout, s);
                using var optimizer = PipelineTrainer.CreateOptimizer(stage, Options);
                var manifest = await stage.LoadCheckpointAsync(store, 5, optimizer);
                Assert.Equal((5L, 1L), (manifest.Step, optimizer.StepCount));
                var tensors = stage.StageTensors(optimizer);
                Assert.NotEmpty(tensors);
                foreach (var (name, t) in tensors)
                {
                    Assert.True(t.eq(expected[name]).all().item<bool>(), $"stage {s}: '{name}' differs from the saved tensor");
                    loadedNames.Add(name);
                }
            }
            // The two stages together hold every tensor of the checkpoint once.
            Assert.Equal(expected.Keys.Order(), loadedNames.Order());
        }
        finally
        {
            if (Directory.Exists(root)) Directory.Delete(root, recursive: true);
        }
    }

    [Fact]
    public async Task ACheckpointOfAnotherModelIsRefusedNamingTheFieldAndTheStageIsUntouched()
    {
        string root = Path.Combine(Path.GetTempPath(), $"pp-stage-refuse-{Guid.NewGuid():N}");
        try
        {
            using var store = new FolderCheckpointStore(root, "stage-refuse");
            await CommitSingleProcessState(store, "stage-refuse", 3);
            var other = Config with { IntermediateSize = 96 };
            var stage = new PipelineStage(NewModel(other, 99), ParallelLayout.Even(1, 2, other.NumHiddenLayers), 1);
            using var optimizer = PipelineTrainer.CreateOptimizer(stage, Options);
            var before = stage.StageTensors(optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            var e = await Assert.ThrowsAsync<InvalidDataException>(() => stage.LoadCheckpointAsync(store, 3, optimizer));
            Assert.Contains("intermediate_size 64", e.Message);
            Assert.Contains("intermediate_size 96", e.Message);
            foreach (var (name, t) in stage.StageTensors(optimizer)) Assert.True(t.eq(before[name]).all().item<bool>(), $"'{name}' was touched");
            Assert.Equal(0, optimizer.StepCount);
        }
        finally
        {
            if (Directory.Exists(root)) Directory.Delete(root, recursive: true);
        }
    }
}
