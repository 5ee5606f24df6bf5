// The store's OpenTelemetry instruments: for now, TLS handshakes refused when mutual TLS is configured.
//   deepseek.checkpoint_store.auth_refusals  {connection} → deepseek_checkpoint_store_auth_refusals_total{surface="tls",reason}
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
        _authRefusals = meter.CreateCounter<long>("deepseek.checkpoint_store.auth_refusals", "{connection}",
            "TLS handshakes refused for a missing or untrusted client certificate (mutual TLS configured).");
        // Exported as 0 from the start, so the first refusal shows as an increase.
        foreach (var reason in ClusterTlsEndpoint.Reasons) _authRefusals.Add(0, Refusal(reason));
    }

    /// <summary>A client refused in the TLS handshake (<see cref="ClusterTlsEndpoint"/>), by reason.</summary>
    public void AuthRefused(string reason) => _authRefusals.Add(1, Refusal(reason));

    static KeyValuePair<string, object?>[] Refusal(string reason) => [new("surface", ClusterTlsEndpoint.Surface), new("reason", reason)];
}
