// Mutual TLS on ClusterControl, when Cluster:Tls:* name the certificate files: the "grpc" Kestrel endpoint (workers
// and services) serves HTTPS and requires a client certificate that chains to the cluster CA (ServiceDefaults'
// ClusterTlsEndpoint, shared with DataShardService and CheckpointStore); refusals count in the Coordinator's
// auth-refusal counter as surface "tls". The "http" endpoint stays cleartext: kubelet probes and Prometheus scrape it,
// and its writes still require the cluster token. Without the keys nothing changes (cleartext h2c + token).
using DeepSeekCluster.ServiceDefaults;

namespace DeepSeekCluster.Coordinator.Security;

public static class ControlChannelTls
{
    /// <summary>The refusal counter's surface for a refused handshake.</summary>
    public const string Surface = ClusterTlsEndpoint.Surface;

    public static IHostApplicationBuilder AddControlChannelTls(this IHostApplicationBuilder builder)
    {
        builder.AddClusterTlsEndpoint("ClusterControl", services =>
        {
            var metrics = services.GetRequiredService<CoordinatorMetrics>();
            return reason => metrics.AuthRefused(Surface, reason);
        });
        return builder;
    }
}
