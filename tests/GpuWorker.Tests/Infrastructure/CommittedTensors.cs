// What the cluster tests compare bit for bit: a job's committed checkpoint, whatever layout saved it, loaded into one
// whole model and AdamW through the same loader a resuming rank uses.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

internal static class CommittedTensors
{
    /// <summary>Step <paramref name="step"/> of <paramref name="job"/> as one replica of <paramref name="spec"/>'s model: every tensor's values by name.</summary>
    public static async Task<Dictionary<string, float[]>> LoadWhole(DataShardsHost data, StoreHost store, string job, JobSpec spec, long step, string staging)
    {
        var request = new GetManifestRequest { DatasetId = data.DatasetId };
        var manifest = data.Client.GetManifest(request);
        var tokenizer = data.Client.GetTokenizer(request);
        var (config, options) = JobPlan.Map(spec with { Parallel = new ParallelPlan() }, (int)manifest.VocabSize, tokenizer.EotTokenId);
        var checkpoints = new GrpcCheckpointStore(store.Client, store.Address, job, staging);
        using var model = new DeepSeekForCausalLM(config);
        using var optimizer = Trainer.CreateOptimizer(model, options);
        await ShardedCheckpointLoader.LoadReplicaAsync(checkpoints, step, model, optimizer, tokenizer.TokenizerHash);
        return CheckpointTensors.Collect(model, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().to_type(ScalarType.Float32).contiguous().data<float>().ToArray());
    }

    /// <summary>Every tensor of <paramref name="actual"/> (<paramref name="job"/>'s) equals the one-worker job's <paramref name="expected"/> bit for bit, and no name is missing or extra.</summary>
    public static void AssertSame(Dictionary<string, float[]> expected, Dictionary<string, float[]> actual, string job)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, values) in expected)
            Assert.True(values.SequenceEqual(actual[name]), $"{name} differs between {job}'s committed checkpoint and the one-worker job's");
    }
}
