// Configuration is checked at start: a bad value stops the service with a message naming the key.
using DeepSeekCluster.CheckpointStore.Tests.Infrastructure;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class StorageOptionsTests
{
    [Fact]
    public async Task ABadStorageSettingStopsTheStartNamingTheKey()
    {
        var e = await Assert.ThrowsAsync<OptionsValidationException>(() =>
            StoreHost.StartAsync(new Dictionary<string, string?> { ["Storage:BlockBytes"] = "12", ["Storage:Folder"] = Path.GetTempPath() }));
        Assert.Contains("Storage:BlockBytes", e.Message);
    }
}
