// The two storage backends the behavioural tests run against: a local folder, and real Azurite on a free port.
namespace DeepSeekCluster.DataShardService.Tests.Infrastructure;

public abstract class StoreBackend : IAsyncLifetime
{
    private readonly List<TestStore> _stores = [];

    /// <summary>A new, empty store; deleted when the backend is disposed.</summary>
    public TestStore NewStore()
    {
        var store = Create();
        lock (_stores) _stores.Add(store);
        return store;
    }

    protected abstract TestStore Create();

    public virtual Task InitializeAsync() => Task.CompletedTask;

    public virtual async Task DisposeAsync()
    {
        foreach (var store in _stores)
            await store.DeleteAsync();
    }
}

public sealed class FolderBackend : StoreBackend
{
    protected override TestStore Create() => new FolderTestStore();
}

/// <summary>Starts Azurite (fails, never skips, when it is not installed); every store is a container of its own.</summary>
public sealed class AzuriteBackend : StoreBackend
{
    private AzuriteServer? _azurite;

    protected override TestStore Create() =>
        new AzuriteTestStore(AzuriteServer.ConnectionString(_azurite?.Port ?? throw new InvalidOperationException("Azurite is not started.")));

    public override async Task InitializeAsync() => _azurite = await AzuriteServer.StartAsync();

    public override async Task DisposeAsync()
    {
        try
        {
            if (_azurite is not null) await base.DisposeAsync();
        }
        finally
        {
            if (_azurite is not null) await _azurite.DisposeAsync();
        }
    }
}
