// Readiness of a Coordinator clustered through Redis: not Ready while Redis does not answer PING, since membership,
// grain state and every job transition go through it. Readiness only: liveness (/alive) never asks Redis, or a Redis
// outage would make Kubernetes restart every silo at once.
using Microsoft.Extensions.Diagnostics.HealthChecks;
using StackExchange.Redis;

namespace DeepSeekCluster.Coordinator;

public sealed class RedisReadiness(string connectionString) : IHealthCheck, IDisposable
{
    public const string Name = "redis";

    /// <summary>Far longer than a healthy PING, shorter than the readiness probe's timeoutSeconds (3 s in k8s/base/coordinator.yaml).</summary>
    static readonly TimeSpan Timeout = TimeSpan.FromSeconds(2);

    readonly SemaphoreSlim connecting = new(1, 1);
    ConnectionMultiplexer? redis;

    public async Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default)
    {
        try
        {
            var connection = await ConnectAsync();
            var rtt = await connection.GetDatabase().PingAsync().WaitAsync(Timeout, cancellationToken);
            return HealthCheckResult.Healthy($"Redis answered PING in {rtt.TotalMilliseconds:F1} ms");
        }
        catch (Exception e) when (e is RedisException or TimeoutException)
        {
            // The connection string may hold a password: name the failure, never the string.
            return HealthCheckResult.Unhealthy($"Redis (ConnectionStrings:{CoordinatorExtensions.RedisConnectionName}) does not answer: {e.GetType().Name}");
        }
    }

    /// <summary>One multiplexer for the process's life: it reconnects by itself once Redis is back.</summary>
    async Task<ConnectionMultiplexer> ConnectAsync()
    {
        if (redis is { } r) return r;
        await connecting.WaitAsync();
        try
        {
            if (redis is null)
            {
                var options = ConfigurationOptions.Parse(connectionString);
                options.AbortOnConnectFail = false; // start while Redis is down, and keep trying
                options.ConnectTimeout = (int)Timeout.TotalMilliseconds;
                redis = await ConnectionMultiplexer.ConnectAsync(options);
            }
            return redis;
        }
        finally { connecting.Release(); }
    }

    public void Dispose() => redis?.Dispose();
}
