// One dataset store for a test, on either backend, with the raw access a test needs to look behind the service.
using Azure;
using Azure.Storage.Blobs;
using DeepSeekCluster.DataShardService.Storage;

namespace DeepSeekCluster.DataShardService.Tests.Infrastructure;

public abstract class TestStore
{
    /// <summary>Configuration that points the service at this store.</summary>
    public abstract IReadOnlyDictionary<string, string?> Settings { get; }

    /// <summary>Paths of the complete objects in the store ("ds-…/train-00000.bin"), ordinal order.</summary>
    public abstract Task<IReadOnlyList<string>> ListAsync();

    public abstract Task<byte[]> ReadAsync(string path);

    /// <summary>Replaces an object's bytes behind the service's back (how tests corrupt a shard).</summary>
    public abstract Task WriteAsync(string path, byte[] bytes);

    public abstract Task DeleteAsync();
}

public sealed class FolderTestStore : TestStore
{
    public string Root { get; } = TestCorpus.NewFolder("store");

    public override IReadOnlyDictionary<string, string?> Settings => new Dictionary<string, string?>
    {
        ["DataShards:Root"] = Root,
        ["DataShards:WorkDir"] = Root + "-work",
    };

    public override Task<IReadOnlyList<string>> ListAsync() => Task.FromResult<IReadOnlyList<string>>(
        Directory.GetFiles(Root, "*", SearchOption.AllDirectories)
            .Select(f => Path.GetRelativePath(Root, f).Replace('\\', '/')).Order(StringComparer.Ordinal).ToList());

    public override Task<byte[]> ReadAsync(string path) => File.ReadAllBytesAsync(Path.Combine(Root, path));

    public override Task WriteAsync(string path, byte[] bytes) => File.WriteAllBytesAsync(Path.Combine(Root, path), bytes);

    public override Task DeleteAsync()
    {
        foreach (var dir in new[] { Root, Root + "-work" })
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        return Task.CompletedTask;
    }
}

/// <summary>A container of its own in a running Azurite, and a shard cache folder of its own.</summary>
public sealed class AzuriteTestStore(string connectionString) : TestStore
{
    private readonly BlobContainerClient _container =
        new BlobServiceClient(connectionString).GetBlobContainerClient($"ds-test-{Guid.NewGuid():N}"[..28]);

    public string CacheDir { get; } = TestCorpus.NewFolder("cache");

    /// <summary>The service's store class on this container and cache, for tests below the gRPC surface.</summary>
    public AzureDatasetStore OpenDirectly(int blockBytes = 65536) => new(_container, CacheDir, blockBytes);

    private string WorkDir { get; } = TestCorpus.NewFolder("work");

    public override IReadOnlyDictionary<string, string?> Settings => new Dictionary<string, string?>
    {
        ["ConnectionStrings:blobs"] = connectionString,
        ["DataShards:Container"] = _container.Name,
        ["DataShards:CacheDir"] = CacheDir,
        ["DataShards:WorkDir"] = WorkDir,
        ["DataShards:BlockBytes"] = "65536", // several blocks a shard, so staging and commit are really exercised
    };

    public override async Task<IReadOnlyList<string>> ListAsync()
    {
        var names = new List<string>();
        try
        {
            await foreach (var blob in _container.GetBlobsAsync())
                names.Add(blob.Name);
        }
        catch (RequestFailedException e) when (e.Status == 404)
        {
            // no container: nothing was ever written
        }
        return names.Order(StringComparer.Ordinal).ToList();
    }

    public override async Task<byte[]> ReadAsync(string path) =>
        (await _container.GetBlobClient(path).DownloadContentAsync()).Value.Content.ToArray();

    public override async Task WriteAsync(string path, byte[] bytes) =>
        await _container.GetBlobClient(path).UploadAsync(BinaryData.FromBytes(bytes), overwrite: true);

    public override async Task DeleteAsync()
    {
        await _container.DeleteIfExistsAsync();
        foreach (var dir in new[] { CacheDir, WorkDir })
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }
}
