// One dataset prepared once per backend (100 chapters, seq_len 32, vocab 300, 400 samples a shard) and the service serving it.
using System.Buffers.Binary;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class FolderPreparedDataset() : PreparedDatasetFixture(new FolderBackend());

public sealed class AzuritePreparedDataset() : PreparedDatasetFixture(new AzuriteBackend());

public abstract class PreparedDatasetFixture(StoreBackend backend) : IAsyncLifetime
{
    public StoreBackend Backend { get; } = backend;
    public string InputFolder { get; } = TestCorpus.NewFolder("input");
    public TestStore Store { get; private set; } = null!;
    public ServiceHost Host { get; private set; } = null!;
    public string DatasetId { get; private set; } = "";
    public DatasetManifest Manifest { get; private set; } = null!;

    public async Task InitializeAsync()
    {
        await Backend.InitializeAsync();
        Store = Backend.NewStore();
        Host = await ServiceHost.StartAsync(Store);
        TestCorpus.WritePlain(InputFolder, "bible.txt", TestCorpus.FirstChapters(100));
        var reply = await Host.Client.PrepareAsync(TestCorpus.Request(32, 300, 400,
            new Source { Name = "bible", Path = InputFolder }));
        DatasetId = reply.DatasetId;
        var manifest = await Host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = DatasetId });
        Manifest = DatasetManifest.FromJson(manifest.ManifestJson, "test");
    }

    /// <summary>Every record of a split, read straight from the stored shards (not through the service).</summary>
    public async Task<uint[][]> ReadSplitDirectlyAsync(string split)
    {
        var records = new List<uint[]>();
        foreach (var shard in Manifest.Splits[split].Shards)
        {
            byte[] bytes = await Store.ReadAsync($"{DatasetId}/{shard.Path}");
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
        if (Host is not null) await Host.DisposeAsync();
        await Backend.DisposeAsync();
        Directory.Delete(InputFolder, recursive: true);
    }
}
