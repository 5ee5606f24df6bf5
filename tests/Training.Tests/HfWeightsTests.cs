// Tests for Hugging Face weight folders: single file, sharding with index.json, stale layouts, broken indexes.
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.IO;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests;

public sealed class HfWeightsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("hf-weights-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>Sizes 160, 128, 16, 160, 400 bytes, in this (state-dict) order.</summary>
    private static List<KeyValuePair<string, Tensor>> SampleWeights()
    {
        var random = new Random(99);
        return
        [
            new("model.embed_tokens.weight", SafeTensorsTests.RandomBits([10, 4], ScalarType.Float32, random)),
            new("model.layers.0.mlp.weight", SafeTensorsTests.RandomBits([16, 4], ScalarType.BFloat16, random)),
            new("model.layers.0.norm.weight", SafeTensorsTests.RandomBits([4], ScalarType.Float32, random)),
            new("lm_head.weight", SafeTensorsTests.RandomBits([10, 4], ScalarType.Float32, random)),
            new("big", SafeTensorsTests.RandomBits([100], ScalarType.Float32, random)),
        ];
    }

    private static void AssertSameTensors(List<KeyValuePair<string, Tensor>> expected, Dictionary<string, Tensor> actual)
    {
        Assert.Equal(expected.Select(kv => kv.Key).Order(), actual.Keys.Order());
        foreach (var (name, t) in expected)
        {
            Assert.Equal(t.dtype, actual[name].dtype);
            Assert.Equal(t.shape, actual[name].shape);
            Assert.Equal(SafeTensorsTests.BytesOf(t), SafeTensorsTests.BytesOf(actual[name]));
        }
    }

    private string[] FileNames() => Directory.GetFiles(_dir).Select(Path.GetFileName).Order().ToArray()!;

    [Fact]
    public void WeightsUnderTheShardLimitSaveAsOneFileWithoutAnIndex()
    {
        using var scope = NewDisposeScope();
        var weights = SampleWeights();

        HfWeights.Save(_dir, weights);

        Assert.Equal(["model.safetensors"], FileNames());
        using (var file = SafeTensors.Open(Path.Combine(_dir, "model.safetensors")))
        {
            Assert.Equal("pt", file.Metadata["format"]);
        }
        AssertSameTensors(weights, HfWeights.Load(_dir));
    }

    [Fact]
    public void ShardedSaveWritesTheHfIndexAndLoadsBackEqual()
    {
        using var scope = NewDisposeScope();
        var weights = SampleWeights();

        HfWeights.Save(_dir, weights, maxShardBytes: 300);

        // Greedy in the given order: 160+128 fill shard 1; "big" (400 > 300) gets a shard of its own
        // at once; 16+160 close the last one. Total 864 bytes.
        Assert.Equal(
            ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json"],
            FileNames());
        const string expectedIndex = """
            {
              "metadata": {
                "total_size": 864
              },
              "weight_map": {
                "big": "model-00002-of-00003.safetensors",
                "lm_head.weight": "model-00003-of-00003.safetensors",
                "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
                "model.layers.0.mlp.weight": "model-00001-of-00003.safetensors",
                "model.layers.0.norm.weight": "model-00003-of-00003.safetensors"
              }
            }

            """;
        Assert.Equal(expectedIndex, File.ReadAllText(Path.Combine(_dir, "model.safetensors.index.json")));

        using (var shard = SafeTensors.Open(Path.Combine(_dir, "model-00001-of-00003.safetensors")))
        {
            Assert.Equal("pt", shard.Metadata["format"]);
            Assert.Equal(["model.embed_tokens.weight", "model.layers.0.mlp.weight"], shard.Tensors.Select(t => t.Name));
        }
        AssertSameTensors(weights, HfWeights.Load(_dir));
    }

    [Fact]
    public void CallerMetadataIsKeptAndFormatPtAdded()
    {
        using var scope = NewDisposeScope();
        HfWeights.Save(_dir, [new("w", ones(2))], metadata: new Dictionary<string, string> { ["step"] = "7" });

        using var file = SafeTensors.Open(Path.Combine(_dir, "model.safetensors"));
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal("7", file.Metadata["step"]);
    }

    [Fact]
    public void ResavingWithAnotherLayoutRemovesTheOldWeightFilesOnly()
    {
        using var scope = NewDisposeScope();
        var weights = SampleWeights();
        File.WriteAllText(Path.Combine(_dir, "config.json"), "{}");

        HfWeights.Save(_dir, weights, maxShardBytes: 300);
        HfWeights.Save(_dir, weights);
        Assert.Equal(["config.json", "model.safetensors"], FileNames());

        HfWeights.Save(_dir, weights, maxShardBytes: 500); // 464 bytes, then "big"
        Assert.Equal(
            ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
            FileNames());
        AssertSameTensors(weights, HfWeights.Load(_dir));
    }

    [Fact]
    public void AnIndexPointingToAMissingShardIsRejectedNamingBoth()
    {
        using var scope = NewDisposeScope();
        HfWeights.Save(_dir, SampleWeights(), maxShardBytes: 300);
        File.Delete(Path.Combine(_dir, "model-00002-of-00003.safetensors"));

        var e = Assert.Throws<InvalidDataException>(() => HfWeights.Load(_dir));
        Assert.Contains("model.safetensors.index.json", e.Message);
        Assert.Contains("model-00002-of-00003.safetensors", e.Message);
        Assert.Contains("does not exist", e.Message);
    }

    [Fact]
    public void AnIndexNamingATensorItsShardLacksIsRejected()
    {
        using var scope = NewDisposeScope();
        HfWeights.Save(_dir, SampleWeights(), maxShardBytes: 300);
        string indexPath = Path.Combine(_dir, "model.safetensors.index.json");
        var index = JsonNode.Parse(File.ReadAllText(indexPath))!;
        index["weight_map"]!["ghost.weight"] = "model-00001-of-00003.safetensors";
        File.WriteAllText(indexPath, index.ToJsonString());

        var e = Assert.Throws<InvalidDataException>(() => HfWeights.Load(_dir));
        Assert.Contains("'ghost.weight'", e.Message);
        Assert.Contains("model-00001-of-00003.safetensors", e.Message);
    }

    [Fact]
    public void AnIndexReachingOutsideItsFolderIsRejected()
    {
        using var scope = NewDisposeScope();
        HfWeights.Save(_dir, SampleWeights(), maxShardBytes: 300);
        string indexPath = Path.Combine(_dir, "model.safetensors.index.json");
        var index = JsonNode.Parse(File.ReadAllText(indexPath))!;
        index["weight_map"]!["big"] = "../elsewhere.safetensors";
        File.WriteAllText(indexPath, index.ToJsonString());

        var e = Assert.Throws<InvalidDataException>(() => HfWeights.Load(_dir));
        Assert.Contains("expected a file name in the same folder", e.Message);
    }

    [Fact]
    public void AFolderWithoutWeightsIsRejected()
    {
        var e = Assert.Throws<FileNotFoundException>(() => HfWeights.Load(_dir));
        Assert.Contains(_dir, e.Message);
    }
}
