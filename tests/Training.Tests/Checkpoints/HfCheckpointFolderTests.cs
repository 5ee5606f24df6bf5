// A sharded checkpoint exported as a Hugging Face folder loads into the same logits; an HF folder imports into a checkpoint.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class HfCheckpointFolderTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-hf-").FullName;

    static Tensor Logits(DeepSeekForCausalLM model)
    {
        model.eval();
        using var noGrad = no_grad();
        using var ids = arange(0, 24, dtype: ScalarType.Int64).remainder(TrainedState.Config.VocabSize).reshape(2, 12);
        return model.Forward(ids).Logits_BTV.detach().clone();
    }

    [Fact]
    public async Task AnExportedCheckpointLoadsWithHfModelFolderIntoTheSameLogitsAndImportsBack()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(Path.Combine(root, "store"), "job");
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, "job", ParallelLayout.Even(4, 2, TrainedState.Config.NumHiddenLayers),
            saved.Tensors, new CheckpointPosition(50, 1, 800, 37), TrainedState.Config.ToJson(), null);
        string hf = Path.Combine(root, "hf");
        await HfCheckpointFolder.ExportAsync(store, 50, hf, maxShardBytes: 1 << 20);

        Assert.True(File.Exists(Path.Combine(hf, HfWeights.IndexFileName)));
        using var expected = Logits(saved.Model);
        var exported = HfModelFolder.Load(hf);
        using (exported.Model)
        {
            using var actual = Logits(exported.Model);
            Assert.True(TrainedState.BitwiseEqual(expected, actual));
            Assert.False(exported.Model.MissingMtpOnLoad);
        }

        using var imported = new FolderCheckpointStore(Path.Combine(root, "imported"), "fine-tune");
        var manifest = await HfCheckpointFolder.ImportAsync(hf, imported, "fine-tune", ParallelLayout.Even(2, 2, TrainedState.Config.NumHiddenLayers));
        Assert.DoesNotContain(manifest.Tensors.Keys, ShardingPlan.IsOptimizerState);
        using var fresh = new TrainedState(3, fill: false);
        fresh.Optimizer.StepCount = 5;
        await ShardedCheckpointLoader.LoadReplicaAsync(imported, 0, fresh.Model, fresh.Optimizer);
        Assert.Equal(0, fresh.Optimizer.StepCount);
        using var again = Logits(fresh.Model);
        Assert.True(TrainedState.BitwiseEqual(expected, again));
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
