// The background save keeps the state of its step, runs one at a time, and reports failures without throwing into training.
using DeepSeekCluster.Training.Checkpoints;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class AsyncCheckpointSaverTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-async-").FullName;

    /// <summary>A folder sink whose publish step waits for the test, or fails.</summary>
    sealed class GatedSink(FolderCheckpointStore inner) : ICheckpointSink
    {
        public TaskCompletionSource Gate { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public bool Fail { get; set; }
        public string LocalPath(long step, int rank) => inner.LocalPath(step, rank);
        public async Task<ManifestFile> PublishAsync(long step, int rank, ManifestFile written, CancellationToken ct = default)
        {
            await Gate.Task;
            if (Fail) throw new IOException("blob storage unreachable");
            return written;
        }
        public Task CommitAsync(CheckpointManifest manifest, CancellationToken ct = default) => inner.CommitAsync(manifest, ct);
    }

    [Fact]
    public async Task ASaveKeepsTheStateOfItsStepWhileTrainingChangesTheTensorsAndLoadsBackBitwise()
    {
        using var state = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, "job");
        var sink = new GatedSink(store);
        var tensors = state.Tensors;
        var layout = ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers);
        var plan = new ShardingPlan(layout, CheckpointTensors.Catalog(tensors));
        var expected = tensors.ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        await using var saver = new AsyncCheckpointSaver(sink, plan, rank: 0);

        var request = saver.Save(10, tensors.ToDictionary());
        Assert.True(request.Started);
        using (no_grad()) foreach (var (_, t) in tensors) t.add_(1); // training goes on before the write happens
        Assert.False(saver.Save(11, tensors.ToDictionary()).Started); // one in flight: skipped
        sink.Gate.SetResult();
        Assert.Null(await saver.WaitAsync());

        var file = saver.LastOutcome!.File!;
        await store.CommitAsync(ShardedCheckpointWriter.Manifest("job", plan, new CheckpointPosition(10, 0, 0, 37), [file], null, null));
        using var loaded = new TrainedState(2, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, 10, loaded.Model, loaded.Optimizer);
        Assert.All(loaded.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), kv.Key));
        Assert.Equal(1, saver.Skipped);
        Assert.True(saver.LastStall > TimeSpan.Zero);
        foreach (var t in expected.Values) t.Dispose();
    }

    [Fact]
    public async Task AFailedBackgroundSaveIsReportedOnceByTheNextSaveAndTheNextSaveRunsAgain()
    {
        using var state = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, "job");
        var sink = new GatedSink(store) { Fail = true };
        sink.Gate.SetResult();
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(2, 2, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        await using var saver = new AsyncCheckpointSaver(sink, plan, rank: 3);

        Assert.True(saver.Save(1, tensors).Started);
        for (var until = DateTime.UtcNow.AddSeconds(30); saver.Busy && DateTime.UtcNow < until;) await Task.Delay(5);
        Assert.False(saver.Busy, "the first save did not finish within 30 s");
        var next = saver.Save(2, tensors);
        Assert.True(next.Started);
        Assert.IsType<IOException>(next.PreviousFailure);
        sink.Fail = false;
        Assert.Null(await saver.WaitAsync());
        Assert.Equal(1, saver.Failed);
        Assert.NotNull(saver.LastOutcome!.File);
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
