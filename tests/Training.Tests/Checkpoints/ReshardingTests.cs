// Sharded checkpoints saved with dp=4, pp=2 load bitwise into other layouts, optimizer moments and routing biases included.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class ReshardingTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-reshard-").FullName;
    const string Job = "job-a";

    static CheckpointPosition Position => new(Step: 120, Generation: 3, ConsumedSamples: 120 * 16, OptimizerSteps: 37);

    async Task<CheckpointManifest> SaveDp4Pp2(TrainedState state, FolderCheckpointStore store) =>
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(4, 2, TrainedState.Config.NumHiddenLayers),
            state.Tensors, Position, TrainedState.Config.ToJson(), tokenizerSha256: new string('a', 64));

    [Theory]
    [InlineData(4, 2)]
    [InlineData(3, 2)]
    [InlineData(1, 1)]
    [InlineData(5, 4)]
    public void EveryRowOfEveryTensorIsWrittenByExactlyOneRank(int dp, int pp)
    {
        using var state = new TrainedState(1);
        var catalog = CheckpointTensors.Catalog(state.Tensors);
        var plan = new ShardingPlan(ParallelLayout.Even(dp, pp, TrainedState.Config.NumHiddenLayers), catalog);
        var written = catalog.ToDictionary(t => t.Name, t => new int[t.Rows]);
        for (int r = 0; r < dp * pp; r++)
            foreach (var s in plan.WritesOf(r))
                for (long i = s.RowStart; i < s.RowEnd; i++) written[s.Name][i]++;
        Assert.All(written, kv => Assert.All(kv.Value, count => Assert.Equal(1, count)));
        Assert.Contains(catalog, t => t.Name.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        Assert.Contains(catalog, t => t.Name.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
    }

    [Fact]
    public async Task ADp4Pp2CheckpointLoadsIntoOneProcessWithWeightsMomentsStepCountAndRoutingBiasesBitwiseIdentical()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        var manifest = await SaveDp4Pp2(saved, store);
        Assert.Equal(8, manifest.Files.Count);
        Assert.Equal([120L], await store.ListStepsAsync());

        using var loaded = new TrainedState(2, fill: false);
        var back = await ShardedCheckpointLoader.LoadReplicaAsync(store, 120, loaded.Model, loaded.Optimizer, tokenizerSha256: new string('a', 64));

        Assert.Equal(37, loaded.Optimizer.StepCount);
        Assert.Equal(Position, back.Position);
        var expected = saved.Tensors;
        var actual = loaded.Tensors.ToDictionary();
        Assert.Equal(expected.Count, actual.Count);
        Assert.All(expected, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, actual[kv.Key]), $"{kv.Key} differs after the reshard"));
        Assert.Contains(expected, kv => kv.Key.EndsWith("e_score_correction_bias", StringComparison.Ordinal) && kv.Value.abs().sum().item<float>() > 0);
        await store.VerifyAsync(120);
    }

    [Fact]
    public async Task ADp4Pp2CheckpointLoadsIntoDp3Pp2WithEachRankGettingExactlyItsStageAndItsOptimizerRows()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        var manifest = await SaveDp4Pp2(saved, store);
        var original = saved.Tensors.ToDictionary();
        var layout = ParallelLayout.Even(3, 2, TrainedState.Config.NumHiddenLayers);
        var plan = ShardingPlan.For(layout, manifest);

        var optimizerRows = original.Keys.Where(ShardingPlan.IsOptimizerState).ToDictionary(n => n, n => new long[plan.Entry(n).Rows]);
        var modelSeenByStage = new HashSet<(int, string)>();
        for (int rank = 0; rank < layout.WorldSize; rank++)
        {
            var needs = plan.NeedsOf(rank, shardOptimizer: true);
            var tensors = await ShardedCheckpointLoader.LoadAsync(store, manifest, needs);
            try
            {
                foreach (var need in needs)
                {
                    using var want = original[need.Name].dim() == 0 ? original[need.Name].alias() : original[need.Name].narrow(0, need.RowStart, need.RowCount);
                    Assert.True(TrainedState.BitwiseEqual(want, tensors[need.Name]), $"rank {rank}: {need.Name} rows [{need.RowStart}, {need.RowEnd}) differ");
                    if (ShardingPlan.IsOptimizerState(need.Name))
                        for (long i = need.RowStart; i < need.RowEnd; i++) optimizerRows[need.Name][i]++;
                    else modelSeenByStage.Add((layout.StageOfRank(rank), need.Name));
                }
            }
            finally { foreach (var t in tensors.Values) t.Dispose(); }
        }
        // Optimizer rows: each exactly once over the new ranks (ZeRO-1); model tensors: whole on every stage that owns them.
        Assert.All(optimizerRows, kv => Assert.All(kv.Value, c => Assert.Equal(1, c)));
        Assert.Equal(original.Keys.Count(n => !ShardingPlan.IsOptimizerState(n)), modelSeenByStage.Select(p => p.Item2).Distinct().Count());
    }

    [Fact]
    public async Task AStepWithoutAManifestIsInvisibleAndASecondCommitOfTheSameStepIsRefused()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        var layout = ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers);
        var plan = new ShardingPlan(layout, CheckpointTensors.Catalog(saved.Tensors));
        ShardedCheckpointWriter.WriteRank(store, plan, 0, 5, saved.Tensors.ToDictionary()); // rank 1 never writes
        Assert.Empty(await store.ListStepsAsync());
        await Assert.ThrowsAsync<FileNotFoundException>(() => store.ReadManifestAsync(5));

        await SaveDp4Pp2(saved, store);
        await Assert.ThrowsAsync<InvalidOperationException>(() => SaveDp4Pp2(saved, store));
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
