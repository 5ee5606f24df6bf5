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

    readonly AuthRefusals _authRefusals;

    public CheckpointStoreMetrics(IMeterFactory meterFactory)
    {
        var meter = meterFactory.Create(MeterName);
        _authRefusals = new AuthRefusals(meter.CreateCounter<long>("deepseek.checkpoint_store.auth_refusals", "{request}", AuthRefusals.Description));
    }

    /// <summary>A client refused in the TLS handshake (<see cref="ClusterTlsEndpoint"/>), by reason.</summary>
    public void AuthRefused(string reason) => _authRefusals.TlsRefused(reason);

    /// <summary>A call refused for its cluster token (<see cref="ClusterTokenGate"/>), by reason.</summary>
    public void TokenRefused(string reason) => _authRefusals.TokenRefused(reason);
}
