// One dataset prepared once (100 chapters, seq_len 32, vocab 300, 400 samples a shard) and the service serving it.
using System.Buffers.Binary;
using System.Text.Json;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class PreparedDatasetFixture : IAsyncLifetime
{
    public string InputFolder { get; } = TestCorpus.NewFolder("input");
    public string StoreRoot { get; } = TestCorpus.NewFolder("store");
    public ServiceHost Host { get; private set; } = null!;
    public string DatasetId { get; private set; } = "";
    public DatasetManifest Manifest { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        Host = await ServiceHost.StartAsync(StoreRoot);
        TestCorpus.WritePlain(InputFolder, "bible.txt", TestCorpus.FirstChapters(100));
        var reply = await Host.Client.PrepareAsync(TestCorpus.Request(32, 300, 400,
            new Source { Name = "bible", Path = InputFolder }));
        DatasetId = reply.DatasetId;
        var manifest = await Host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = DatasetId });
        Manifest = DatasetManifest.FromJson(manifest.ManifestJson, "test");
    }

    /// <summary>Every record of a split, read straight from the shard files (not through the service).</summary>
    public uint[][] ReadSplitDirectly(string split)
    {
        var records = new List<uint[]>();
        foreach (var shard in Manifest.Splits[split].Shards)
        {
            byte[] bytes = File.ReadAllBytes(Path.Combine(StoreRoot, DatasetId, shard.Path));
            for (int r = 0; r < bytes.Length / Manifest.RecordBytes; r++)
            {
                var tokens = new uint[Manifest.SampleTokens];
                for (int i = 0; i < tokens.Length; i++)
                    tokens[i] = BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(r * Manifest.RecordBytes + 2 * i));
                records.Add(tokens);
            }
        }
        return records.ToArray();
    }

    public async Task DisposeAsync()
    {
        await Host.DisposeAsync();
        Directory.Delete(StoreRoot, recursive: true);
        Directory.Delete(InputFolder, recursive: true);
    }
}

[CollectionDefinition(Name)]
public sealed class PreparedDatasetCollection : ICollectionFixture<PreparedDatasetFixture>
{
    public const string Name = "prepared dataset";
}
