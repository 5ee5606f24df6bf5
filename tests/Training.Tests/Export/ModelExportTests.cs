// Exports from committed checkpoints of any layout into exports/{job}/{step}/{format}/: hashes, atomicity, refusals.
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Export;

public sealed class ModelExportTests(ExportModelFixture fx) : IClassFixture<ExportModelFixture>, IDisposable
{
    const string Job = "export-job";
    const long Step = 5;
    readonly string root = Directory.CreateTempSubdirectory("export-store-").FullName;
    string Exports => Path.Combine(root, "exports");

    /// <summary>The fixture's model saved as dp 2 x pp 2: every rank holds a slice, none the whole model.</summary>
    FolderCheckpointStore SavePipelineCheckpoint()
    {
        var store = new FolderCheckpointStore(root, Job);
        ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(2, 2, fx.Model.Config.NumHiddenLayers),
            CheckpointTensors.Collect(fx.Model, null), new CheckpointPosition(Step, 1, 0, Step), fx.Model.Config.ToJson(), fx.Tokenizer.Hash)
            .GetAwaiter().GetResult();
        return store;
    }

    [Fact]
    public async Task APipelineCheckpointExportsToAnHfFolderWithTheSameWeightsAndVerifiedHashes()
    {
        using var store = SavePipelineCheckpoint();
        var (folder, manifest) = await ModelExport.FromCheckpointAsync(store, null, fx.Tokenizer, "hf", Exports);

        Assert.Equal(Path.Combine(Exports, Job, "00000005", "hf"), folder);
        Assert.Equal(Step, manifest.Step);
        Assert.Contains(manifest.Files, f => f.Path == "config.json");
        Assert.Contains(manifest.Files, f => f.Path == "tokenizer.json");
        Assert.Contains(manifest.Files, f => f.Path == "generation_config.json");
        ModelExport.Verify(folder);

        var loaded = HfModelFolder.Load(folder);
        using var model = loaded.Model;
        var ours = fx.Model.state_dict();
        foreach (var (name, t) in model.state_dict())
            Assert.True(t.equal(ours[name]).all().item<bool>(), $"tensor {name} differs after export");
        Assert.Equal(fx.Tokenizer.Hash, loaded.Tokenizer!.Hash);
    }

    [Fact]
    public async Task ABf16ExportStoresBf16Weights()
    {
        using var store = SavePipelineCheckpoint();
        var (folder, _) = await ModelExport.FromCheckpointAsync(store, Step, fx.Tokenizer, "hf-bf16", Exports);
        using var file = SafeTensors.Open(Path.Combine(folder, HfWeights.SingleFileName));
        Assert.All(file.Tensors, t => Assert.Equal("BF16", t.Dtype));
        Assert.Contains("bfloat16", File.ReadAllText(Path.Combine(folder, "config.json")));
    }

    [Fact]
    public async Task AnOnnxExportHoldsBothGraphsTheTokenizerAndTheConfig()
    {
        using var store = SavePipelineCheckpoint();
        var (folder, manifest) = await ModelExport.FromCheckpointAsync(store, Step, fx.Tokenizer, "onnx", Exports);
        Assert.Equal(["config.json", "decode.onnx", "model.onnx", "tokenizer.json"], manifest.Files.Select(f => f.Path));
        ModelExport.Verify(folder);
    }

    [Fact]
    public async Task ACorruptRankFileIsRefusedByNameAndNothingIsLeftInTheStore()
    {
        using (SavePipelineCheckpoint()) { }
        var rankFile = Path.Combine(root, Job, "00000005", ShardingPlan.FileOf(3));
        var bytes = File.ReadAllBytes(rankFile);
        bytes[^10] ^= 0xFF; // inside the last tensor's data: the header still parses, the hash does not match
        File.WriteAllBytes(rankFile, bytes);

        using var store = new FolderCheckpointStore(root, Job);
        var e = await Assert.ThrowsAnyAsync<Exception>(() => ModelExport.FromCheckpointAsync(store, Step, fx.Tokenizer, "gguf-q8_0", Exports));
        Assert.Contains(ShardingPlan.FileOf(3), e.Message);
        Assert.False(Directory.Exists(Exports) && Directory.EnumerateFileSystemEntries(Exports, "*", SearchOption.AllDirectories).Any(),
            "a failed export left files in the store");
    }

    [Fact]
    public async Task AnotherTokenizerAnUnknownFormatAndAnUncommittedStepAreRefused()
    {
        using var store = SavePipelineCheckpoint();
        var other = BpeTokenizer.Train(["a different corpus, a different tokenizer"], vocabSize: 270);
        var wrongTokenizer = await Assert.ThrowsAsync<InvalidDataException>(() => ModelExport.FromCheckpointAsync(store, Step, other, "hf", Exports));
        Assert.Contains("tokenizer", wrongTokenizer.Message);

        var unknown = await Assert.ThrowsAsync<ArgumentException>(() => ModelExport.FromCheckpointAsync(store, Step, fx.Tokenizer, "onnx-fp8", Exports));
        Assert.Contains("'onnx-fp8'", unknown.Message);
        Assert.Contains("gguf-q4_0", unknown.Message);

        var missing = await Assert.ThrowsAsync<InvalidDataException>(() => ModelExport.FromCheckpointAsync(store, 6, fx.Tokenizer, "hf", Exports));
        Assert.Contains("step 6 is not committed", missing.Message);
        Assert.False(Directory.Exists(Path.Combine(Exports, Job)));
    }

    [Fact]
    public void AModelGgufCannotExpressIsRefusedWithTheReasonAndLeavesNoFolder()
    {
        using var model = ExportModelFixture.Build(fx.Tokenizer.VocabSize, c => c with { NSharedExperts = 0 });
        var folder = ModelExport.FolderOf(Exports, Job, Step, "gguf-f16");
        var e = Assert.Throws<NotSupportedException>(() => ModelExport.Write(model, fx.Tokenizer, "gguf-f16", folder, Job, Step, "test"));
        Assert.Contains("n_shared_experts", e.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(Path.GetDirectoryName(folder)!));
    }

    [Fact]
    public void AttentionBiasesAreRefusedByGgufAndOnnxAlike()
    {
        using var model = ExportModelFixture.Build(fx.Tokenizer.VocabSize, c => c with { AttentionBias = true });
        foreach (var format in new[] { "gguf-q8_0", "onnx" })
        {
            var folder = ModelExport.FolderOf(Exports, Job, Step, format);
            var e = Assert.Throws<NotSupportedException>(() => ModelExport.Write(model, fx.Tokenizer, format, folder, Job, Step, "test"));
            Assert.Contains("attention_bias", e.Message);
            Assert.False(Directory.Exists(folder));
        }
    }

    [Fact]
    public void AnExistingExportIsNeverOverwrittenAndTamperingIsFound()
    {
        var folder = ModelExport.FolderOf(Exports, Job, Step, "gguf-q4_0");
        ModelExport.Write(fx.Model, fx.Tokenizer, "gguf-q4_0", folder, Job, Step, "test");
        Assert.Throws<IOException>(() => ModelExport.Write(fx.Model, fx.Tokenizer, "gguf-q4_0", folder, Job, Step, "test"));

        var gguf = Path.Combine(folder, "model.gguf");
        var bytes = File.ReadAllBytes(gguf);
        bytes[^1] ^= 1;
        File.WriteAllBytes(gguf, bytes);
        var e = Assert.Throws<InvalidDataException>(() => ModelExport.Verify(folder));
        Assert.Contains("model.gguf", e.Message);
    }

    public void Dispose()
    {
        try { Directory.Delete(root, recursive: true); } catch (IOException) { }
    }
}
