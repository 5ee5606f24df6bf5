// The storage services' refusal counter: gRPC calls refused for their cluster token, TLS handshakes for their certificate.
using System.Diagnostics.Metrics;

namespace DeepSeekCluster.ServiceDefaults;

/// <summary>
/// One counter labelled by surface (<see cref="ClusterTokenGate.Surface"/>, <see cref="ClusterTlsEndpoint.Surface"/>)
/// and reason; every series is exported as 0 from the start, so the first refusal shows as an increase.
/// </summary>
public sealed class AuthRefusals
{
    readonly Counter<long> counter;

    public const string Description =
        "gRPC calls refused for a missing or wrong cluster token (surface grpc), and TLS handshakes refused for a missing or untrusted client certificate (surface tls).";

    /// <param name="counter">The service's own counter (created where its name is written, unit {request}, with <see cref="Description"/>).</param>
    public AuthRefusals(Counter<long> counter)
    {
        this.counter = counter;
        foreach (var reason in ClusterTlsEndpoint.Reasons) counter.Add(0, Labels(ClusterTlsEndpoint.Surface, reason));
        foreach (var reason in ClusterTokenGate.Reasons) counter.Add(0, Labels(ClusterTokenGate.Surface, reason));
    }

    /// <summary>A client refused in the TLS handshake (<see cref="ClusterTlsEndpoint"/>), by reason.</summary>
    public void TlsRefused(string reason) => counter.Add(1, Labels(ClusterTlsEndpoint.Surface, reason));

    /// <summary>A call refused for its cluster token (<see cref="ClusterTokenGate"/>), by reason.</summary>
    public void TokenRefused(string reason) => counter.Add(1, Labels(ClusterTokenGate.Surface, reason));

    static KeyValuePair<string, object?>[] Labels(string surface, string reason) => [new("surface", surface), new("reason", reason)];
}
