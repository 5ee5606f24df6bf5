// GrpcCheckpointStore against the real CheckpointStore service: a dp=2 save loads back bitwise, a dropped upload resumes,
// an unreachable store is named in the error.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Checkpoints;
using Grpc.Net.Client;
using Microsoft.Extensions.Logging;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class GrpcCheckpointStoreTests : IAsyncLifetime
{
    StoreHost host = null!;
    readonly string staging = Directory.CreateTempSubdirectory("gpuworker-staging-").FullName;

    static readonly CheckpointPosition Position = new(Step: 40, Generation: 2, ConsumedSamples: 40 * 8, OptimizerSteps: 37);
    static ParallelLayout Dp2 => ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers);
    static readonly GrpcCheckpointStoreOptions Fast = new() { ChunkBytes = 64 * 1024, RetryBaseDelay = TimeSpan.FromMilliseconds(50) };

    public async Task InitializeAsync() => host = await StoreHost.StartAsync();

    public async Task DisposeAsync()
    {
        await host.DisposeAsync();
        Directory.Delete(staging, recursive: true);
    }

    [Fact]
    public async Task ADp2SaveThroughTheStoreLoadsBackWithWeightsAndMomentsBitwiseEqual()
    {
        using var saved = new TrainedState(1);
        var store = new GrpcCheckpointStore(host.Client, host.Address, "round-trip", staging, Fast);
        var manifest = await ShardedCheckpointWriter.SaveAllRanksAsync(store, "round-trip", Dp2, saved.Tensors, Position,
            TrainedState.Config.ToJson(), tokenizerSha256: new string('b', 64));
        Assert.Equal(2, manifest.Files.Count);
        Assert.Equal([40L], await store.ListStepsAsync());
        Assert.False(File.Exists(store.LocalPath(40, 0)), "the staged file is deleted once the store holds it");
        // The writer's XXH128 chunk hashes went up with each file; the store verified them and the committed manifest carries them.
        var committed = await store.ReadManifestAsync(40);
        Assert.All(manifest.Files.Zip(committed.Files), p =>
        {
            Assert.Equal(ManifestFile.DefaultChunkBytes, p.Second.ChunkBytes);
            Assert.Equal(p.First.ChunkXxh128!, p.Second.ChunkXxh128!);
            Assert.Equal(ChunkHashAlgorithm.Xxh128, p.Second.ChunkHashes!.Algorithm);
        });

        using var loaded = new TrainedState(2, fill: false);
        var back = await ShardedCheckpointLoader.LoadReplicaAsync(store, 40, loaded.Model, loaded.Optimizer, tokenizerSha256: new string('b', 64));

        Assert.Equal(Position, back.Position);
        Assert.Equal(37, loaded.Optimizer.StepCount);
        var actual = loaded.Tensors.ToDictionary();
        Assert.All(saved.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, actual[kv.Key]), $"{kv.Key} differs after the round trip"));
        Assert.Contains(saved.Tensors, kv => kv.Key.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
    }

    [Fact]
    public async Task AnUploadWhoseConnectionDropsResumesWhereTheStoreBytesEnd()
    {
        using var state = new TrainedState(3);
        var plan = new ShardingPlan(Dp2, CheckpointTensors.Catalog(state.Tensors));
        var tensors = state.Tensors.ToDictionary();
        var direct = new GrpcCheckpointStore(host.Client, host.Address, "resume", staging, Fast);
        var rank1 = ShardedCheckpointWriter.WriteRank(direct, plan, 1, 40, tensors);

        // Rank 0 uploads through a proxy that resets the connection after 2 MiB went up: enough that the store has
        // taken in some 64 KiB chunks before the reset even on a loaded machine.
        const int dropAfter = 2 * 1024 * 1024;
        using var proxy = new DroppingProxy(host.Port, dropAfterBytes: dropAfter);
        using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{proxy.Port}");
        var log = new ListLogger();
        var flaky = new GrpcCheckpointStore(new Store.CheckpointStoreClient(channel), $"http://127.0.0.1:{proxy.Port}", "resume", staging, Fast, log);
        var rank0 = ShardedCheckpointWriter.WriteRank(flaky, plan, 0, 40, tensors);

        Assert.True(proxy.Dropped);
        Assert.True(rank0.Size > 2 * dropAfter, $"rank 0's file ({rank0.Size} bytes) must be much larger than the bytes sent before the drop");
        var resumed = Assert.Single(log.Messages, m => m.StartsWith("Resuming the upload of rank-0.safetensors", StringComparison.Ordinal));
        long offset = long.Parse(resumed.Split(" at byte ")[1].Split(' ')[0]);
        Assert.InRange(offset, 1, dropAfter);

        await direct.CommitAsync(ShardedCheckpointWriter.Manifest("resume", plan, Position, [rank0, rank1], null, null));
        using var loaded = new TrainedState(4, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(direct, 40, loaded.Model, loaded.Optimizer);
        var actual = loaded.Tensors.ToDictionary();
        Assert.All(state.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, actual[kv.Key]), $"{kv.Key} differs after a resumed upload"));
    }

    [Fact]
    public async Task AnUnreachableStoreIsNamedAfterAFewAttempts()
    {
        string address = $"http://127.0.0.1:{FreePort.Next()}";
        using var channel = GrpcChannel.ForAddress(address);
        var store = new GrpcCheckpointStore(new Store.CheckpointStoreClient(channel), address, "nowhere", staging,
            Fast with { Attempts = 3, RetryBaseDelay = TimeSpan.FromMilliseconds(10) });
        string path = store.LocalPath(1, 0);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        await File.WriteAllBytesAsync(path, [1, 2, 3]);

        var e = await Assert.ThrowsAsync<IOException>(() => store.PublishAsync(1, 0, new ManifestFile("rank-0.safetensors", 3, new string('c', 64))));
        Assert.Contains(address, e.Message);
        Assert.Contains("3 attempts", e.Message);
        Assert.True(File.Exists(path), "a failed upload keeps the staged file for the next try");
    }

    sealed class ListLogger : ILogger<GrpcCheckpointStore>
    {
        public List<string> Messages { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (Messages) Messages.Add(formatter(state, exception));
        }
    }
}
