// The store's OpenTelemetry instruments: for now, refusals: TLS handshakes (mutual TLS configured) and calls without the token.
//   deepseek.checkpoint_store.auth_refusals  {request} → deepseek_checkpoint_store_auth_refusals_total{surface="tls"|"grpc",reason}
// The meter comes from the host's IMeterFactory (each host and each test has its own instruments); ServiceDefaults
// exports every DeepSeekCluster* meter.
using System.Diagnostics.Metrics;
using DeepSeekCluster.ServiceDefaults;

namespace DeepSeekCluster.CheckpointStore;

public sealed class CheckpointStoreMetrics
{
    public const string MeterName = "DeepSeekCluster.CheckpointStore";

    readonly Counter<long> _authRefusals;

    public CheckpointStoreMetrics(IMeterFactory meterFactory)
    {
        var meter = meterFactory.Create(MeterName);
        _authRefusals = meter.CreateCounter<long>("deepseek.checkpoint_store.auth_refusals", "{request}",
            "gRPC calls refused for a missing or wrong cluster token (surface grpc), and TLS handshakes refused for a missing or untrusted client certificate (surface tls).");
        // Exported as 0 from the start, so the first refusal shows as an increase.
        foreach (var reason in ClusterTlsEndpoint.Reasons) _authRefusals.Add(0, Refusal(ClusterTlsEndpoint.Surface, reason));
        foreach (var reason in ClusterTokenGate.Reasons) _authRefusals.Add(0, Refusal(ClusterTokenGate.Surface, reason));
    }

    /// <summary>A client refused in the TLS handshake (<see cref="ClusterTlsEndpoint"/>), by reason.</summary>
    public void AuthRefused(string reason) => _authRefusals.Add(1, Refusal(ClusterTlsEndpoint.Surface, reason));

    /// <summary>A call refused for its cluster token (<see cref="ClusterTokenGate"/>), by reason.</summary>
    public void TokenRefused(string reason) => _authRefusals.Add(1, Refusal(ClusterTokenGate.Surface, reason));

    static KeyValuePair<string, object?>[] Refusal(string surface, string reason) => [new("surface", surface), new("reason", reason)];
}
