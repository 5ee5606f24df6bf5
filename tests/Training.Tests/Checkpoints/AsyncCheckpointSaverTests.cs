// The background save keeps the state of its step, runs one at a time, and reports failures without throwing into training.
using DeepSeekCluster.Training.Parallel;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class AsyncCheckpointSaverTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-async-").FullName;

    /// <summary>A folder sink whose publish step waits for the test, or fails.</summary>
    sealed class GatedSink(FolderCheckpointStore inner) : ICheckpointSink
    {
        public TaskCompletionSource Gate { get; set; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
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
        var told = new System.Collections.Concurrent.ConcurrentQueue<SaveOutcome>();
        await using var saver = new AsyncCheckpointSaver(sink, plan, rank: 3, (o, _) => { told.Enqueue(o); return Task.CompletedTask; });

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
        // The callback hears of both, so a worker can report which step its store did not take.
        Assert.Equal([(1L, false, true), (2L, true, false)], told.Select(o => (o.Step, o.File is not null, o.Error is IOException)));
    }

    /// <summary>A trainer over <paramref name="state"/>'s model and AdamW (whose moments it carries on), on random tokens.</summary>
    static Trainer TrainerOf(TrainedState state)
    {
        var options = new TrainingOptions { SeqLen = 16, GlobalBatch = 2, MicroBatch = 2, Steps = 1_000, WarmupSteps = 1 };
        var rng = new Random(3);
        var tokens = new int[(options.SeqLen + 1) * 32];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(TrainedState.Config.VocabSize);
        return new Trainer(state.Model, new PermutedSamples(new TokenDataset(tokens, options.SeqLen), 1), null, options, CPU, 1e12,
            optimizer: state.Optimizer);
    }

    /// <summary>
    /// A background copy reads the checkpoint tensors until the trainer's BeforeStateChange hook, so nothing before
    /// the hook may swap their storage, not even the first step, where the optimizer makes the parameters views of its
    /// flat buffers: that swap beside a running copy freed the storage the copy read (a CI test host died in libc10 on
    /// the ckpt-save thread). The parameters do move into the flat buffers, in the update.
    /// </summary>
    [Fact]
    public void TheFirstStepSwapsNoCheckpointTensorsStorageBeforeItsUpdateHookAndTheParametersMoveInTheUpdate()
    {
        using var state = new TrainedState(1);
        using var trainer = TrainerOf(state);
        var tensors = state.Tensors.ToDictionary();
        var before = tensors.ToDictionary(kv => kv.Key, kv => Address(kv.Value));
        var moved = new List<string>();
        bool hooked = false;
        trainer.BeforeStateChange = _ =>
        {
            hooked = true;
            moved.AddRange(tensors.Where(kv => Address(kv.Value) != before[kv.Key]).Select(kv => kv.Key));
        };
        trainer.TrainStep();
        Assert.True(hooked);
        Assert.Empty(moved);
        var parameters = state.Model.named_parameters().Select(p => state.Model.ToHfName(p.name)).ToHashSet();
        Assert.Contains(tensors, kv => parameters.Contains(kv.Key) && Address(kv.Value) != before[kv.Key]);
    }

    [Theory]
    [InlineData(true)]  // the background thread and the training thread copy side by side, after the forward/backward
    [InlineData(false)] // the background thread is held until the snapshot is done: the training thread copies it all
    public async Task ABackgroundCopyHoldsTheStateOfTheStepBoundaryThoughTheNextForwardAndBackwardRanBeforeItStarted(bool backgroundJoins)
    {
        using var state = new TrainedState(1);
        using var trainer = TrainerOf(state);
        trainer.TrainStep(); // gradients exist, the moments are AdamW's own
        using var asyncStore = new FolderCheckpointStore(root, "async");
        using var blockingStore = new FolderCheckpointStore(root, "blocking");
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        const int rank = 1;
        long step = trainer.Step;
        ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, step, tensors); // the reference: a blocking save at the boundary
        byte[] expected = File.ReadAllBytes(blockingStore.LocalPath(step, rank));

        await using var saver = new AsyncCheckpointSaver(asyncStore, plan, rank);
        var forwardDone = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var snapshotDone = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        saver.BeforeBackgroundCopy = () => backgroundJoins ? forwardDone.Task : snapshotDone.Task;
        bool pendingAtUpdate = false;
        TimeSpan? waited = null;
        trainer.BeforeStateChange = _ =>
        {
            pendingAtUpdate = saver.SnapshotPending;
            forwardDone.SetResult();
            waited = saver.WaitForSnapshot();
            snapshotDone.TrySetResult();
        };

        var request = saver.BeginSave(step, tensors);
        Assert.True(request.Started);
        Assert.True(saver.SnapshotPending);
        trainer.TrainStep(); // forward, backward, then (in the hook) the copy, then the update
        Assert.True(pendingAtUpdate, "nothing was copied before the optimizer update, so the snapshot was still pending there");
        Assert.NotNull(waited);
        Assert.False(saver.SnapshotPending);
        Assert.Null(await saver.WaitAsync());

        Assert.Equal(expected, File.ReadAllBytes(asyncStore.LocalPath(step, rank)));
        // The step did change the saved tensors: a blocking save now writes other bytes.
        ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, step + 1, tensors);
        Assert.NotEqual(expected, File.ReadAllBytes(blockingStore.LocalPath(step + 1, rank)));
        Assert.Equal(expected.Length, saver.LastOutcome!.File!.Size);
        Assert.Equal(request.Stall + waited!.Value, saver.LastStall);
    }

    [Fact]
    public async Task BackgroundSavesWithReusedBuffersWriteTheSameBytesAsBlockingSavesAtEachBoundary()
    {
        using var state = new TrainedState(2);
        using var trainer = TrainerOf(state);
        using var asyncStore = new FolderCheckpointStore(root, "async");
        using var blockingStore = new FolderCheckpointStore(root, "blocking");
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        await using var saver = new AsyncCheckpointSaver(asyncStore, plan, 0);
        trainer.BeforeStateChange = _ => saver.WaitForSnapshot();
        for (int i = 0; i < 3; i++)
        {
            trainer.TrainStep();
            long step = trainer.Step;
            ShardedCheckpointWriter.WriteRank(blockingStore, plan, 0, step, tensors);
            Assert.True(saver.BeginSave(step, tensors).Started);
            trainer.TrainStep(); // the copy runs beside this step's forward and backward
            Assert.Null(await saver.WaitAsync());
            Assert.Equal(File.ReadAllBytes(blockingStore.LocalPath(step, 0)), File.ReadAllBytes(asyncStore.LocalPath(step, 0)));
        }
        Assert.Equal(3, saver.Started);
    }

    [Fact]
    public async Task AFailedBackgroundCopyDoesNotThrowIntoTrainingAndIsReportedByTheNextSave()
    {
        using var state = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, "job");
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        await using var saver = new AsyncCheckpointSaver(store, plan, 0);
        string dropped = plan.WritesOf(0)[^1].Name;
        var missing = tensors.Where(kv => kv.Key != dropped).ToDictionary();
        Assert.True(saver.BeginSave(5, missing).Started);
        Assert.NotNull(saver.WaitForSnapshot()); // returns, does not throw
        for (var until = DateTime.UtcNow.AddSeconds(30); saver.Busy && DateTime.UtcNow < until;) await Task.Delay(5);
        Assert.False(saver.Busy, "the failed save did not finish within 30 s");
        var next = saver.Save(6, tensors);
        Assert.True(next.Started);
        var e = Assert.IsType<KeyNotFoundException>(next.PreviousFailure);
        Assert.Contains($"'{dropped}'", e.Message);
        Assert.Null(await saver.WaitAsync());
        Assert.Equal(1, saver.Failed);
        Assert.False(File.Exists(store.LocalPath(5, 0)));
    }

    /// <summary>Where a tensor's bytes start in memory.</summary>
    static nint Address(Tensor t) => Unsafe.ByteOffset(ref Unsafe.NullRef<byte>(), ref MemoryMarshal.GetReference(t.bytes));

    [Fact]
    public async Task TheHostCopiesAreReusedAcrossSavesAndEachSaveWritesTheSameFileAsABlockingSaveOfItsStep()
    {
        using var state = new TrainedState(1);
        using var asyncStore = new FolderCheckpointStore(root, "async");
        using var blockingStore = new FolderCheckpointStore(root, "blocking");
        var sink = new GatedSink(asyncStore);
        sink.Gate.SetResult();
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(2, 2, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        const int rank = 3; // row slices of the last stage's tensors: the copies are of narrowed views
        await using var saver = new AsyncCheckpointSaver(sink, plan, rank);
        Assert.Empty(saver.HostBuffers);

        // The blocking save streams from the live tensors without any host copy: the reference bytes of each step.
        byte[] Blocking(long step)
        {
            ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, step, tensors);
            return File.ReadAllBytes(blockingStore.LocalPath(step, rank));
        }
        byte[] Saved(long step) => File.ReadAllBytes(asyncStore.LocalPath(step, rank));

        Assert.True(saver.Save(1, tensors).Started);
        Assert.Null(await saver.WaitAsync());
        var first = saver.HostBuffers.ToDictionary(kv => kv.Key, kv => (Tensor: kv.Value, Address: Address(kv.Value)));
        Assert.Equal(plan.WritesOf(rank).Count(), first.Count);
        Assert.Equal(Blocking(1), Saved(1));

        using (no_grad()) foreach (var (_, t) in tensors) t.mul_(-0.5).add_(0.25); // the next interval's weights
        Assert.True(saver.Save(2, tensors).Started);
        Assert.Null(await saver.WaitAsync());
        Assert.Equal(first.Keys.Order(), saver.HostBuffers.Select(kv => kv.Key).Order());
        Assert.All(saver.HostBuffers, kv =>
        {
            Assert.Same(first[kv.Key].Tensor, kv.Value);
            Assert.Equal(first[kv.Key].Address, Address(kv.Value));
        });
        byte[] second = Saved(2);
        Assert.Equal(Blocking(2), second);
        Assert.NotEqual(Saved(1), second);

        // While a write reads the buffers, a request is skipped without touching them: the file keeps its step's state.
        sink.Gate = new(TaskCreationOptions.RunContinuationsAsynchronously);
        byte[] expected3 = Blocking(3);
        Assert.True(saver.Save(3, tensors).Started);
        using (no_grad()) foreach (var (_, t) in tensors) t.add_(1);
        Assert.False(saver.Save(4, tensors).Started);
        sink.Gate.SetResult();
        Assert.Null(await saver.WaitAsync());
        Assert.Equal(expected3, Saved(3));
        Assert.All(saver.HostBuffers, kv => Assert.Equal(first[kv.Key].Address, Address(kv.Value)));
    }

    [Fact]
    public void ARefilledSnapshotOfAnotherShapeReplacesOnlyTheBuffersThatNoLongerFit()
    {
        using var state = new TrainedState(1);
        var tensors = state.Tensors.ToDictionary();
        var catalog = CheckpointTensors.Catalog(tensors);
        var whole = new ShardingPlan(ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers), catalog);
        var sharded = new ShardingPlan(ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers), catalog);
        using var old = ShardedCheckpointWriter.CopyToHost(whole, 0, 1, tensors);
        var oldTensors = old.Slices.ToDictionary(kv => kv.Key, kv => kv.Value);
        var oldShapes = old.Slices.ToDictionary(kv => kv.Key, kv => kv.Value.shape);

        using var next = ShardedCheckpointWriter.CopyToHost(sharded, 1, 2, tensors, reuse: old);
        Assert.Empty(old.Slices);
        int reused = 0, fitting = 0;
        foreach (var s in sharded.WritesOf(1))
        {
            var copy = next.Slices.Single(kv => kv.Key == s.Name).Value;
            using var live = tensors[s.Name].dim() == 0 ? tensors[s.Name].alias() : tensors[s.Name].narrow(0, s.RowStart, s.RowCount);
            Assert.True(TrainedState.BitwiseEqual(live, copy), s.Name);
            if (oldShapes[s.Name].SequenceEqual(live.shape)) fitting++;
            if (ReferenceEquals(copy, oldTensors[s.Name])) reused++;
            else Assert.True(oldTensors[s.Name].IsInvalid, $"{s.Name}: the replaced buffer was not freed");
        }
        Assert.Equal(fitting, reused); // exactly the buffers whose shape still fits were refilled
        Assert.True(reused < sharded.WritesOf(1).Count(), "every buffer was reused although the row slices shrank");
    }

    /// <summary>The calling thread's nice value and kernel id, from /proc/thread-self/stat (fields 19 and 4 after the name).</summary>
    static (int Nice, int Tid) OwnThreadStat()
    {
        string stat = File.ReadAllText("/proc/thread-self/stat");
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' '); // the name may hold spaces; fields[0] is field 3
        return (int.Parse(fields[19 - 3]), int.Parse(stat[..stat.IndexOf(' ')]));
    }

    [Fact]
    public async Task TheBackgroundCopyAndWriteRunOnAThreadBackgroundNiceStepsBelowTrainingAndStillWriteTheBlockingSavesBytes()
    {
        Assert.True(OperatingSystem.IsLinux(), "per-thread nice values are Linux's");
        using var state = new TrainedState(1);
        using var asyncStore = new FolderCheckpointStore(root, "async");
        using var blockingStore = new FolderCheckpointStore(root, "blocking");
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(2, 2, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        const int rank = 2;
        var (trainingNice, trainingTid) = OwnThreadStat();
        (int Nice, int Tid)? background = null, reported = null;
        await using var saver = new AsyncCheckpointSaver(asyncStore, plan, rank, (_, _) =>
        {
            reported = OwnThreadStat(); // the callback, after the write, runs where tasks complete: at normal priority
            return Task.CompletedTask;
        }) { BackgroundNice = 15 };
        saver.BeforeBackgroundCopy = () => { background = OwnThreadStat(); return Task.CompletedTask; };

        Assert.True(saver.BeginSave(4, tensors).Started);
        saver.WaitForSnapshot();
        Assert.Null(await saver.WaitAsync());

        Assert.NotNull(background);
        Assert.NotEqual(trainingTid, background.Value.Tid);
        Assert.Equal(Math.Min(19, trainingNice + 15), background.Value.Nice);
        Assert.Equal(trainingNice, reported!.Value.Nice);
        Assert.Equal(trainingNice, OwnThreadStat().Nice); // the training thread keeps its priority
        // No thread is left at the lowered priority: a pool worker created by the lowered thread would inherit it for good.
        // The lowered thread itself is joined, but its OS thread may take a moment to exit after that.
        List<string> Lowered() => Directory.GetDirectories("/proc/self/task").Select(d =>
        {
            try
            {
                string stat = File.ReadAllText(Path.Combine(d, "stat"));
                return (Thread: stat[..(stat.LastIndexOf(')') + 1)], Nice: int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[19 - 3]));
            }
            catch (IOException) { return (Thread: d, Nice: trainingNice); } // a thread that exited meanwhile
        }).Where(t => t.Nice != trainingNice).Select(t => t.Thread).ToList();
        var left = Lowered();
        for (var until = DateTime.UtcNow.AddSeconds(30); left.Count > 0 && DateTime.UtcNow < until; left = Lowered()) await Task.Delay(10);
        Assert.Empty(left);
        ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, 4, tensors);
        Assert.Equal(File.ReadAllBytes(blockingStore.LocalPath(4, rank)), File.ReadAllBytes(asyncStore.LocalPath(4, rank)));
    }

    [Fact]
    public async Task PreparedHostCopiesAreTheOnesTheFirstSaveFillsAndASaveRightAfterPrepareStillWritesTheBlockingSavesBytes()
    {
        using var state = new TrainedState(1);
        using var asyncStore = new FolderCheckpointStore(root, "async");
        using var blockingStore = new FolderCheckpointStore(root, "blocking");
        var tensors = state.Tensors.ToDictionary();
        var plan = new ShardingPlan(ParallelLayout.Even(2, 2, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        const int rank = 3;
        var slices = plan.WritesOf(rank);

        await using (var saver = new AsyncCheckpointSaver(asyncStore, plan, rank))
        {
            await saver.Prepare(tensors);
            var prepared = saver.HostBuffers.ToDictionary(kv => kv.Key, kv => (Tensor: kv.Value, Address: Address(kv.Value)));
            Assert.Equal(slices.Select(s => s.Name).Order(), prepared.Keys.Order());
            foreach (var s in slices)
            {
                using var live = tensors[s.Name].dim() == 0 ? tensors[s.Name].alias() : tensors[s.Name].narrow(0, s.RowStart, s.RowCount);
                Assert.Equal(live.shape, prepared[s.Name].Tensor.shape);
                Assert.Equal(live.dtype, prepared[s.Name].Tensor.dtype);
            }
            Assert.Same(saver.Prepare(tensors), saver.Prepare(tensors)); // prepared once: never a second set of buffers

            Assert.True(saver.BeginSave(1, tensors).Started);
            saver.WaitForSnapshot();
            Assert.Null(await saver.WaitAsync());
            Assert.All(saver.HostBuffers, kv => Assert.Equal(prepared[kv.Key].Address, Address(kv.Value)));
            ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, 1, tensors);
            Assert.Equal(File.ReadAllBytes(blockingStore.LocalPath(1, rank)), File.ReadAllBytes(asyncStore.LocalPath(1, rank)));
            Assert.Same(Task.CompletedTask, saver.Prepare(tensors)); // the saver holds its copies: nothing more to make
        }

        // A save right after Prepare stops it wherever it is and allocates what it had not made yet.
        await using (var saver = new AsyncCheckpointSaver(asyncStore, plan, rank))
        {
            var preparing = saver.Prepare(tensors);
            Assert.True(saver.Save(2, tensors).Started);
            Assert.True(preparing.IsCompleted);
            Assert.Null(await saver.WaitAsync());
            Assert.Equal(slices.Count, saver.HostBuffers.Count);
            ShardedCheckpointWriter.WriteRank(blockingStore, plan, rank, 2, tensors);
            Assert.Equal(File.ReadAllBytes(blockingStore.LocalPath(2, rank)), File.ReadAllBytes(asyncStore.LocalPath(2, rank)));
        }
    }

    [Fact]
    public void TensorsLargerThanOneCopyPieceAreCopiedWholeInRowRunsIntoTheirSlices()
    {
        // 12,000 x 300 fp32 (two ranks' halves of 7.2 MB: one piece each) and 40,001 x 257 bf16 (halves of 10.3 MB: two
        // pieces each, split between rows, one row not a divisor of the piece size).
        manual_seed(5);
        var tensors = new Dictionary<string, Tensor>
        {
            ["model.embed_tokens.weight"] = randn(12_000, 300),
            ["lm_head.weight"] = randn(40_001, 257).to(ScalarType.BFloat16),
            ["model.norm.weight"] = randn(300),
        };
        Assert.True(tensors["lm_head.weight"].numel() * 2 /* bytes */ / 2 /* ranks */ > HostCopy.PieceBytes, "the test needs a slice of several pieces");
        var plan = new ShardingPlan(ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        for (int rank = 0; rank < 2; rank++)
        {
            using var copy = ShardedCheckpointWriter.CopyToHost(plan, rank, 1, tensors);
            Assert.Equal(plan.WritesOf(rank).Select(s => s.Name), copy.Slices.Select(kv => kv.Key));
            foreach (var s in plan.WritesOf(rank))
            {
                using var live = tensors[s.Name].narrow(0, s.RowStart, s.RowCount);
                Assert.True(TrainedState.BitwiseEqual(live, copy.Slices.Single(kv => kv.Key == s.Name).Value), $"{s.Name} of rank {rank}");
            }
        }
        foreach (var t in tensors.Values) t.Dispose();
    }

    /// <summary>
    /// torch's thread count is the calling thread's own (OpenMP), so the scenario runs on one thread of its own, without
    /// awaits. The write is held at its publish (the gated sink), so the save is in flight for certain while the count is read.
    /// </summary>
    [Fact]
    public Task ATrainerThatYieldsATorchThreadRunsWithOneFewerWhileTheSaveRunsAndGetsItBackOnceItIsDoneOrTheRunEnds() =>
        Task.Factory.StartNew(YieldScenario, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    void YieldScenario()
    {
        int threads = get_num_threads();
        set_num_threads(2);
        try
        {
            using var state = new TrainedState(1);
            using var trainer = TrainerOf(state);
            using var store = new FolderCheckpointStore(root, "job");
            var sink = new GatedSink(store);
            var tensors = state.Tensors.ToDictionary();
            var plan = new ShardingPlan(ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
            var saver = new AsyncCheckpointSaver(sink, plan, 0) { YieldTorchThreads = 1 };
            trainer.BeforeStateChange = _ => saver.WaitForSnapshot();
            var expected = tensors.ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());

            Assert.True(saver.BeginSave(7, tensors).Started);
            Assert.Equal(1, get_num_threads());
            trainer.TrainStep(); // changes every tensor after its WaitForSnapshot; the write is still held
            Assert.True(saver.Busy);
            Assert.Equal(1, get_num_threads());
            saver.RestoreThreads(); // nothing to give back while the save runs
            Assert.Equal(1, get_num_threads());

            sink.Gate.SetResult();
            Assert.Null(saver.WaitAsync().GetAwaiter().GetResult());
            saver.RestoreThreads();
            Assert.Equal(2, get_num_threads());
            using var written = new TrainedState(2, fill: false);
            var file = saver.LastOutcome!.File!;
            store.CommitAsync(ShardedCheckpointWriter.Manifest("job", plan, new CheckpointPosition(7, 0, 0, 1), [file], null, null)).GetAwaiter().GetResult();
            ShardedCheckpointLoader.LoadReplicaAsync(store, 7, written.Model, written.Optimizer).GetAwaiter().GetResult();
            Assert.All(written.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), kv.Key));

            // The end of a run (SnapshotScope) gives the threads back even while the write is still held.
            var held = new GatedSink(store);
            var scoped = new AsyncCheckpointSaver(held, plan, 0) { YieldTorchThreads = 1 };
            using (scoped.SnapshotScope())
            {
                Assert.True(scoped.BeginSave(9, tensors).Started);
                Assert.Equal(1, get_num_threads());
            }
            Assert.True(scoped.Busy);
            Assert.Equal(2, get_num_threads());
            held.Gate.SetResult();
            Assert.Null(scoped.WaitAsync().GetAwaiter().GetResult());
            scoped.DisposeAsync().AsTask().GetAwaiter().GetResult();

            // A saver that yields nothing leaves the count alone.
            var plainSaver = new AsyncCheckpointSaver(store, plan, 0);
            Assert.True(plainSaver.BeginSave(8, tensors).Started);
            Assert.Equal(2, get_num_threads());
            Assert.Null(plainSaver.WaitAsync().GetAwaiter().GetResult());
            saver.DisposeAsync().AsTask().GetAwaiter().GetResult();
            plainSaver.DisposeAsync().AsTask().GetAwaiter().GetResult();
            foreach (var t in expected.Values) t.Dispose();
        }
        finally { set_num_threads(threads); }
    }

    /// <summary>
    /// The bytes of a rank file against writers that share none of its code: SafeTensors.Save's file, SHA-256 of the
    /// whole file and XXH128 of each chunk, with chunks that end inside the writer's cache-sized pieces and tensors larger
    /// than one piece, so the file is what rank files were before they were hashed and written piece by piece.
    /// </summary>
    [Fact]
    public async Task ARankFileIsTheSafeTensorsFileOfItsSlicesAndItsHashesAreThoseOfTheWholeFileAndOfEachChunk()
    {
        manual_seed(11);
        var tensors = new Dictionary<string, Tensor>
        {
            ["model.embed_tokens.weight"] = randn(700, 300),                              // 840,000 bytes: several pieces
            ["lm_head.weight"] = randn(333, 257).to(ScalarType.BFloat16),
            ["model.norm.weight"] = randn(300),
        };
        const long chunk = 100_003; // no divisor of the 256 KiB pieces
        using var store = new FolderCheckpointStore(root, "job") { HashChunkBytes = chunk };
        var plan = new ShardingPlan(ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers), CheckpointTensors.Catalog(tensors));
        var file = ShardedCheckpointWriter.WriteRank(store, plan, 0, 3, tensors);
        string reference = Path.Combine(root, "reference.safetensors");
        DeepSeekCluster.Training.IO.SafeTensors.Save(reference, [.. tensors], new Dictionary<string, string> { ["format"] = "pt" });

        var bytes = await File.ReadAllBytesAsync(store.LocalPath(3, 0));
        Assert.Equal(await File.ReadAllBytesAsync(reference), bytes);
        Assert.Equal(bytes.Length, file.Size);
        Assert.Equal(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(bytes)), file.Sha256);
        var chunks = Enumerable.Range(0, (int)((bytes.Length + chunk - 1) / chunk))
            .Select(i => ChunkHash.Xxh128Hex(bytes.AsSpan((int)(i * chunk), (int)Math.Min(chunk, bytes.Length - i * chunk)))).ToList();
        Assert.True(chunks.Count > 8, "the test needs a file of many chunks");
        Assert.Equal(chunks, file.ChunkXxh128);
        Assert.Equal(chunk, file.ChunkBytes);
        foreach (var t in tensors.Values) t.Dispose();
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
