// The worker's settings bind from the environment variables the AppHost, the k8s manifests and the tests set, and a bad
// value stops the worker at start with a message naming its key.
using DeepSeekCluster.GpuWorker.Cluster;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.GpuWorker.Tests;

public class WorkerSettingsTests
{
    static readonly Dictionary<string, string> Cluster = new()
    {
        ["services__coordinator__grpc__0"] = "http://127.0.0.1:7001",
        ["services__data-shards__grpc__0"] = "http://127.0.0.1:7002",
        ["services__checkpoints__grpc__0"] = "http://127.0.0.1:7003",
        ["Cluster__Token"] = "secret",
    };

    /// <summary>A host whose configuration is these environment variables (under a prefix of its own, so tests do not meet).</summary>
    static IHost Host(IReadOnlyDictionary<string, string> variables)
    {
        var prefix = $"WST{Guid.NewGuid():N}_";
        foreach (var (k, v) in variables) Environment.SetEnvironmentVariable(prefix + k, v);
        var builder = Microsoft.Extensions.Hosting.Host.CreateEmptyApplicationBuilder(new HostApplicationBuilderSettings());
        builder.Configuration.AddEnvironmentVariables(prefix);
        builder.AddWorkerSettings();
        return builder.Build();
    }

    [Fact]
    public async Task TheEnvironmentVariablesOfTheAppHostAndKubernetesBindToTheSettings()
    {
        using var host = Host(new Dictionary<string, string>(Cluster)
        {
            ["Worker__Id"] = "gpu-worker-3", ["Worker__CollectiveHost"] = "10.0.0.7", ["Worker__CollectivePort"] = "29500",
            ["Worker__PipelinePort"] = "29501", ["Worker__Device"] = "cpu", ["Worker__OutputDir"] = "/data/out",
            ["Worker__HeartbeatInterval"] = "2.5", ["Worker__CollectiveTimeout"] = "00:00:45",
        });
        await host.StartAsync();
        var s = host.Services.GetRequiredService<WorkerSettings>();
        Assert.Equal((new Uri("http://127.0.0.1:7001"), new Uri("http://127.0.0.1:7002"), new Uri("http://127.0.0.1:7003"), "secret"),
                     (s.Coordinator, s.DataShards, s.Checkpoints, s.Token));
        Assert.Equal(("gpu-worker-3", "10.0.0.7", 29500, 29501, "cpu", "/data/out"), (s.WorkerId, s.CollectiveHost, s.CollectivePort, s.PipelinePort, s.Device, s.OutputDir));
        Assert.Equal((TimeSpan.FromSeconds(2.5), TimeSpan.FromSeconds(45)), (s.HeartbeatInterval, s.CollectiveTimeout));
        Assert.Null(s.Tls);
        await host.StopAsync();
    }

    [Fact]
    public async Task UnsetWorkerKeysTakeTheirDefaults()
    {
        using var host = Host(Cluster);
        await host.StartAsync();
        var s = host.Services.GetRequiredService<WorkerSettings>();
        Assert.Equal((0, 0, "auto", Path.Combine("runs", "cluster")), (s.CollectivePort, s.PipelinePort, s.Device, s.OutputDir));
        Assert.Equal((TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(30)), (s.HeartbeatInterval, s.CollectiveTimeout));
        await host.StopAsync();
    }

    [Fact]
    public async Task BadWorkerValuesStopTheHostAtStartNamingEachKey()
    {
        using var host = Host(new Dictionary<string, string>(Cluster)
        {
            ["Worker__CollectivePort"] = "70000", ["Worker__HeartbeatInterval"] = "soon", ["Worker__CollectiveTimeout"] = "-3",
        });
        var e = await Assert.ThrowsAsync<OptionsValidationException>(() => host.StartAsync());
        var all = string.Join("\n", e.Failures);
        Assert.Contains("Worker:CollectivePort (Worker__CollectivePort) = 70000 is not a port number", all);
        Assert.Contains("Worker:HeartbeatInterval (Worker__HeartbeatInterval) = 'soon' is not a positive duration", all);
        Assert.Contains("Worker:CollectiveTimeout (Worker__CollectiveTimeout) = '-3' is not a positive duration", all);
    }

    [Fact]
    public void MissingServiceAddressesAndTokenAreAllNamedAtOnce()
    {
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["services:coordinator:grpc:0"] = "not a uri",
        }).Build();
        var e = Assert.Throws<ArgumentException>(() => WorkerSettings.From(new WorkerOptions(), configuration));
        Assert.Contains("services__coordinator__grpc__0='not a uri' is not an absolute URI", e.Message);
        Assert.Contains("services__data-shards__grpc__0 is not set", e.Message);
        Assert.Contains("services__checkpoints__grpc__0 is not set", e.Message);
        Assert.Contains("Cluster__Token is not set", e.Message);
    }
}
