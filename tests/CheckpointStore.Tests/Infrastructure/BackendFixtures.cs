// One running store per backend, shared by the tests of a class; each test uses its own job id.
using DeepSeekCluster.CheckpointStore.Storage;

namespace DeepSeekCluster.CheckpointStore.Tests.Infrastructure;

public abstract class BackendFixture : IAsyncLifetime
{
    public StoreHost Host { get; protected set; } = null!;

    /// <summary>Makes the blob storage unreachable (true) or reachable again (false).</summary>
    public abstract void SetStorageLost(bool lost);

    public abstract Task InitializeAsync();
    public abstract Task DisposeAsync();
}

public sealed class FolderBackendFixture : BackendFixture
{
    private readonly string _folder = Path.Combine(Path.GetTempPath(), $"ckpt-tests-{Guid.NewGuid():N}");
    private SwitchableBlobBackend? _switch;

    public override async Task InitializeAsync() =>
        Host = await StoreHost.StartAsync(new Dictionary<string, string?> { ["Storage:Folder"] = _folder },
            inner => _switch = new SwitchableBlobBackend(inner));

    // Running as root, a read-only folder would still be writable; a lost mount is simulated at the backend's edge instead.
    public override void SetStorageLost(bool lost) => _switch!.Unreachable = lost;

    public override async Task DisposeAsync()
    {
        await Host.DisposeAsync();
        if (Directory.Exists(_folder)) Directory.Delete(_folder, recursive: true);
    }
}

public sealed class AzuriteBackendFixture : BackendFixture
{
    private AzuriteServer? _azurite;
    private CuttableTcpProxy? _proxy;

    public override async Task InitializeAsync()
    {
        _azurite = await AzuriteServer.StartAsync();
        // The store talks to Azurite through a proxy, so a test can cut the network while Azurite keeps its data.
        _proxy = new CuttableTcpProxy(_azurite.Port);
        Host = await StoreHost.StartAsync(new Dictionary<string, string?> { ["ConnectionStrings:blobs"] = AzuriteServer.ConnectionString(_proxy.Port) });
    }

    public override void SetStorageLost(bool lost)
    {
        if (lost) _proxy!.Cut(); else _proxy!.Restore();
    }

    public override async Task DisposeAsync()
    {
        if (Host is not null) await Host.DisposeAsync();
        _proxy?.Dispose();
        if (_azurite is not null) await _azurite.DisposeAsync();
    }
}
