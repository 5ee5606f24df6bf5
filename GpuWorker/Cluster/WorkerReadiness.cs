// The worker's readiness (/health): Ready only while the Coordinator has registered it on the current control stream.
// Not liveness: /alive answers from the process alone, so a Coordinator outage never gets a worker restarted.
using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class WorkerReadiness : IHealthCheck
{
    public const string Name = "registered";

    /// <summary>The response header the Coordinator sends once Hello has registered the worker (ClusterControlService).</summary>
    public const string RegisteredHeader = "deepseek-registered";

    volatile string state = "connecting to the coordinator";
    volatile bool registered;

    public bool Registered => registered;

    public void Connected()
    {
        state = "registered with the coordinator";
        registered = true;
    }

    public void Disconnected(string why)
    {
        registered = false;
        state = why;
    }

    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default) =>
        Task.FromResult(registered ? HealthCheckResult.Healthy(state) : HealthCheckResult.Unhealthy(state));
}
