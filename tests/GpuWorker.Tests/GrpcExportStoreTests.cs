// A checkpoint committed in the real CheckpointStore service, exported into its ExportStore and downloaded back: same weights, checked hashes.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class GrpcExportStoreTests : IAsyncLifetime
{
    StoreHost host = null!;
    readonly string scratch = Directory.CreateTempSubdirectory("gpuworker-export-").FullName;

    public async Task InitializeAsync() => host = await StoreHost.StartAsync();

    public async Task DisposeAsync()
    {
        await host.DisposeAsync();
        Directory.Delete(scratch, recursive: true);
    }

    static BpeTokenizer Tokenizer()
    {
        var words = Enumerable.Range(0, 400).Select(i => $"word{i % 37} thing{i % 11} and{i % 5}");
        return BpeTokenizer.Train([string.Join(' ', words)], vocabSize: 290);
    }

    [Fact]
    public async Task ACheckpointInTheStoreExportsIntoItAndDownloadsBackWithTheSameWeights()
    {
        var tokenizer = Tokenizer();
        using var model = DeepSeekForCausalLM.FromSeed(DeepSeekConfig.Tiny(tokenizer.VocabSize), 3);
        var checkpoints = new GrpcCheckpointStore(host.Client, host.Address, "exported", Path.Combine(scratch, "staging"));
        await ShardedCheckpointWriter.SaveAllRanksAsync(checkpoints, "exported", ParallelLayout.Even(2, 2, model.Config.NumHiddenLayers),
            CheckpointTensors.Collect(model, null), new CheckpointPosition(12, 1, 0, 12), model.Config.ToJson(), tokenizer.Hash);

        var exports = new GrpcExportStore(new ExportStore.ExportStoreClient(host.Channel), host.Address);
        var (folder, manifest) = await ModelExport.FromCheckpointAsync(checkpoints, null, tokenizer, "hf", Path.Combine(scratch, "local"));
        string key = await exports.UploadAsync(folder, manifest);
        Assert.Equal("exports/exported/00000012/hf/export.json", key);
        var listed = Assert.Single(await exports.ListAsync("exported"));
        Assert.Equal(manifest.Files.Sum(f => f.Bytes), listed.TotalBytes);

        var downloaded = Path.Combine(scratch, "downloaded");
        await exports.DownloadAsync(GrpcExportStore.KeyOf(manifest), downloaded);
        var loaded = HfModelFolder.Load(downloaded);
        using var back = loaded.Model;
        var ours = model.state_dict();
        Assert.All(back.state_dict(), kv => Assert.True(kv.Value.equal(ours[kv.Key]).all().item<bool>(), $"{kv.Key} differs after the store round trip"));

        // An export of a committed step is immutable: a second, different upload of it is refused by the store.
        var again = ModelExport.Describe(folder, "hf", "exported", 12, "another exporter", tokenizer.Hash);
        var refused = await Assert.ThrowsAsync<IOException>(() => exports.UploadAsync(folder, again));
        Assert.Contains("exports/exported/00000012/hf/", refused.Message);
    }

    [Fact]
    public async Task AnExportUploadTheStoreStopsTakingInEndsAfterTheSilenceTimeoutNamingTheStoreAndTheFile()
    {
        var tokenizer = Tokenizer();
        using var model = DeepSeekForCausalLM.FromSeed(DeepSeekConfig.Tiny(tokenizer.VocabSize), 5);
        var checkpoints = new GrpcCheckpointStore(host.Client, host.Address, "silent-export", Path.Combine(scratch, "staging"));
        await ShardedCheckpointWriter.SaveAllRanksAsync(checkpoints, "silent-export", ParallelLayout.Even(1, 1, model.Config.NumHiddenLayers),
            CheckpointTensors.Collect(model, null), new CheckpointPosition(12, 1, 0, 12), model.Config.ToJson(), tokenizer.Hash);
        var (folder, manifest) = await ModelExport.FromCheckpointAsync(checkpoints, null, tokenizer, "hf", Path.Combine(scratch, "local"));
        Assert.True(manifest.Files.Max(f => f.Bytes) > 4 << 20, "the weights file must be far larger than what HTTP/2 lets through unread");

        // The store takes in 256 KiB, then reads nothing more and answers nothing, keeping the connection open.
        using var proxy = new StallingProxy(host.Port, upstreamBytes: 256 * 1024);
        string address = $"http://127.0.0.1:{proxy.Port}";
        using var channel = Grpc.Net.Client.GrpcChannel.ForAddress(address);
        var exports = new GrpcExportStore(new ExportStore.ExportStoreClient(channel), address, silenceTimeout: TimeSpan.FromSeconds(2));

        var e = await Assert.ThrowsAsync<IOException>(() => exports.UploadAsync(folder, manifest).WaitAsync(TimeSpan.FromMinutes(2)));

        Assert.True(proxy.Stalled);
        Assert.StartsWith($"the export store at {address} took in nothing for 2 s during the upload of ", e.Message);
        Assert.EndsWith(" of silent-export/12/hf", e.Message);
    }
}
