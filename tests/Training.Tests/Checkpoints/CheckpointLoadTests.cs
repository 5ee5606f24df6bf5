// A replica load reads straight into the live tensors, checks every file's hash as it streams, and refuses a checkpoint of another model untouched.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class CheckpointLoadTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-load-").FullName;
    const string Job = "job-load";
    const long Step = 40;

    static CheckpointPosition Position => new(Step, Generation: 2, ConsumedSamples: Step * 8, OptimizerSteps: 33);

    static Task<CheckpointManifest> Save(FolderCheckpointStore store, TrainedState state, int dp, int pp, string? configJson) =>
        ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(dp, pp, TrainedState.Config.NumHiddenLayers),
            state.Tensors, Position, configJson, tokenizerSha256: null);

    /// <summary>The store seen only as an <see cref="ICheckpointSource"/>, as the gRPC store is: the loader takes the copying path.</summary>
    sealed class PlainSource(ICheckpointSource inner) : ICheckpointSource
    {
        public Task<IReadOnlyList<long>> ListStepsAsync(CancellationToken ct = default) => inner.ListStepsAsync(ct);
        public Task<CheckpointManifest> ReadManifestAsync(long step, CancellationToken ct = default) => inner.ReadManifestAsync(step, ct);
        public Task<Tensor> ReadAsync(long step, string file, string tensor, (long Start, long Count)? rows, CancellationToken ct = default) =>
            inner.ReadAsync(step, file, tensor, rows, ct);
    }

    static Dictionary<string, Tensor> Snapshot(DeepSeekForCausalLM model, AdamW optimizer) =>
        CheckpointTensors.Collect(model, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.clone());

    static void AssertSame(IReadOnlyDictionary<string, Tensor> expected, DeepSeekForCausalLM model, AdamW optimizer, string what)
    {
        var actual = CheckpointTensors.Collect(model, optimizer).ToDictionary();
        Assert.Equal(expected.Count, actual.Count);
        Assert.All(expected, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, actual[kv.Key]), $"{kv.Key}: {what}"));
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(2, 2)]
    public async Task TheDirectLoadIntoLiveTensorsEqualsTheSavedStateAndTheCopyingPathBitwise(int dp, int pp)
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        await Save(store, saved, dp, pp, TrainedState.Config.ToJson());
        var expected = Snapshot(saved.Model, saved.Optimizer);

        using var direct = new TrainedState(2, fill: false);
        var liveBefore = CheckpointTensors.Collect(direct.Model, direct.Optimizer); // aliases of the storage the model has now
        var manifest = await ShardedCheckpointLoader.LoadReplicaAsync(store, Step, direct.Model, direct.Optimizer);
        Assert.Equal(Position, manifest.Position);
        Assert.Equal(33, direct.Optimizer.StepCount);
        AssertSame(expected, direct.Model, direct.Optimizer, "differs after the direct load");
        // The bytes went into the memory the model already had, not into tensors that replaced it.
        Assert.All(liveBefore, kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), $"{kv.Key}: the old storage was not filled"));

        using var copied = new TrainedState(3, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(new PlainSource(store), Step, copied.Model, copied.Optimizer);
        AssertSame(expected, copied.Model, copied.Optimizer, "differs after the copying load");
    }

    /// <summary>
    /// A remote-like source: every read waits until <see cref="ShardedCheckpointLoader.ReadsInFlight"/> reads wait at
    /// once (or the loader has no more to start), so a loader that reads one tensor at a time never gets past the first.
    /// </summary>
    sealed class OverlapGate(ICheckpointSource inner, int expectedReads, string? failOn = null) : ICheckpointSource
    {
        readonly Lock gate = new();
        readonly List<TaskCompletionSource> waiting = [];
        int started;
        public int MostWaiting { get; private set; }
        public Task<IReadOnlyList<long>> ListStepsAsync(CancellationToken ct = default) => inner.ListStepsAsync(ct);
        public Task<CheckpointManifest> ReadManifestAsync(long step, CancellationToken ct = default) => inner.ReadManifestAsync(step, ct);

        public async Task<Tensor> ReadAsync(long step, string file, string tensor, (long Start, long Count)? rows, CancellationToken ct = default)
        {
            var mine = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            lock (gate)
            {
                started++;
                waiting.Add(mine);
                MostWaiting = Math.Max(MostWaiting, waiting.Count);
                if (waiting.Count == ShardedCheckpointLoader.ReadsInFlight || started == expectedReads)
                {
                    foreach (var w in waiting) w.SetResult();
                    waiting.Clear();
                }
            }
            await mine.Task.WaitAsync(TimeSpan.FromSeconds(60), ct);
            if (tensor == failOn) throw new IOException($"the source could not read '{tensor}'");
            return await inner.ReadAsync(step, file, tensor, rows, ct);
        }
    }

    [Fact]
    public async Task TheCopyingLoadReadsSeveralTensorsAtOnceInOrderOfTheRequestAndAFailedReadFailsItNamingTheTensor()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        var manifest = await Save(store, saved, 1, 1, TrainedState.Config.ToJson());
        var needs = manifest.Tensors.Select(kv => new TensorSlice(kv.Key, 0, kv.Value.Rows)).ToList();
        Assert.True(needs.Count > 2 * ShardedCheckpointLoader.ReadsInFlight, $"{needs.Count} tensors");

        var overlapping = new OverlapGate(store, needs.Count);
        var loaded = await ShardedCheckpointLoader.LoadAsync(overlapping, manifest, needs);
        try
        {
            Assert.Equal(ShardedCheckpointLoader.ReadsInFlight, overlapping.MostWaiting);
            var expected = saved.Tensors.ToDictionary();
            Assert.Equal(needs.Select(n => n.Name), loaded.Keys);
            Assert.All(loaded, kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), kv.Key));
        }
        finally { foreach (var t in loaded.Values) t.Dispose(); }

        string victim = needs[needs.Count / 2].Name;
        var failing = new OverlapGate(store, needs.Count, failOn: victim);
        var e = await Assert.ThrowsAsync<IOException>(() => ShardedCheckpointLoader.LoadAsync(failing, manifest, needs));
        Assert.Contains(victim, e.Message);
    }

    [Fact]
    public async Task WithoutAnOptimizerTheWeightsLoadAndTheOptimizerStateIsOnlyHashed()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        await Save(store, saved, 1, 1, TrainedState.Config.ToJson());
        using var target = new TrainedState(2, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, optimizer: null);
        var expected = saved.Model.HfStateDict().ToDictionary();
        Assert.All(target.Model.HfStateDict(), kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), kv.Key));
        Assert.All(target.Optimizer.Slots, s => Assert.Equal(0f, s.ExpAvg.abs().sum().item<float>()));
    }

    [Fact]
    public async Task AManifestForADifferentModelIsRefusedNamingTheDifferingFieldsAndTheModelIsLeftUntouched()
    {
        var other = TrainedState.Config with { HiddenSize = 256, NRoutedExperts = 16 };
        manual_seed(5);
        using var bigger = new DeepSeekForCausalLM(other).InitializeWeights();
        using var biggerOptimizer = new AdamW(bigger.named_parameters().Select(p => (bigger.ToHfName(p.name), (Tensor)p.parameter)));
        using var store = new FolderCheckpointStore(root, Job);
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(2, 2, other.NumHiddenLayers),
            CheckpointTensors.Collect(bigger, biggerOptimizer), Position, other.ToJson(), null);

        using var target = new TrainedState(2);
        var before = Snapshot(target.Model, target.Optimizer);
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer));
        Assert.Contains($"step {Step} of job '{Job}'", e.Message);
        Assert.Contains("hidden_size 256, n_routed_experts 16", e.Message);
        Assert.Contains("this model has hidden_size 128, n_routed_experts 8", e.Message);
        AssertSame(before, target.Model, target.Optimizer, "was changed by a refused load");
        Assert.Equal(37, target.Optimizer.StepCount);
    }

    [Fact]
    public async Task WithoutAConfigTheTensorCatalogueRefusesAnotherModelAndTheModelIsLeftUntouched()
    {
        var other = TrainedState.Config with { NRoutedExperts = 16 };
        manual_seed(5);
        using var wider = new DeepSeekForCausalLM(other).InitializeWeights();
        using var store = new FolderCheckpointStore(root, Job);
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(1, 1, other.NumHiddenLayers),
            CheckpointTensors.Collect(wider, null), Position, configJson: null, null);

        using var target = new TrainedState(2);
        var before = Snapshot(target.Model, target.Optimizer);
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer));
        Assert.Contains("does not fit this model", e.Message);
        Assert.Contains("tensors this model does not have: model.layers.1.mlp.experts.1", e.Message); // experts 8..15, sorted by name
        Assert.Contains("'model.layers.1.mlp.gate.weight' is [16, 128] in the checkpoint, [8, 128] in this model", e.Message);
        AssertSame(before, target.Model, target.Optimizer, "was changed by a refused load");
    }

    [Fact]
    public async Task AFileOfTheWrongSizeIsRefusedBeforeAnyTensorIsWritten()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job);
        await Save(store, saved, 2, 1, TrainedState.Config.ToJson());
        string victim = Path.Combine(store.StepFolder(Step), ShardingPlan.FileOf(1));
        using (var f = new FileStream(victim, FileMode.Open)) f.SetLength(f.Length - 4);

        using var target = new TrainedState(2);
        var before = Snapshot(target.Model, target.Optimizer);
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer));
        Assert.Contains("rank-1.safetensors", e.Message);
        Assert.Contains("the manifest says", e.Message);
        AssertSame(before, target.Model, target.Optimizer, "was changed by a refused load");
    }

    [Fact]
    public async Task AFlippedByteInTensorDataIsCaughtByTheHashWhileStreaming()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job) { HashChunkBytes = null }; // the whole-file hash alone, as older manifests have
        var manifest = await Save(store, saved, 1, 1, TrainedState.Config.ToJson());
        string victim = Path.Combine(store.StepFolder(Step), ShardingPlan.FileOf(0));
        using (var f = new FileStream(victim, FileMode.Open))
        {
            f.Position = f.Length / 2; // well inside the tensor data: the header is a few KB
            int b = f.ReadByte();
            f.Position--;
            f.WriteByte((byte)(b ^ 0x40));
        }
        using var target = new TrainedState(2, fill: false);
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer));
        Assert.Contains(victim, e.Message);
        Assert.Contains($"the manifest says {manifest.Files[0].Sha256}", e.Message);
        Assert.Contains("partial load", e.Message);
    }

    public void Dispose() => Directory.Delete(root, true);
}
