// Mutual TLS on a service's "grpc" Kestrel endpoint, when Cluster:Tls:* name the certificate files: the endpoint serves
// HTTPS and requires a client certificate that chains to the cluster CA; anything else is refused in the handshake,
// logged and counted by the service. The "http" endpoint stays cleartext: kubelet probes and Prometheus cannot present
// client certificates. Without the keys nothing changes (cleartext h2c). One implementation for every gRPC server of
// the cluster: the Coordinator's ClusterControl, DataShardService, CheckpointStore.
using System.Net;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.ServiceDefaults;

public static class ClusterTlsEndpoint
{
    /// <summary>The Kestrel endpoint that serves gRPC (ServiceDefaults' two-endpoint layout).</summary>
    public const string Endpoint = "grpc";

    /// <summary>The refusal counters' surface label for a refused handshake.</summary>
    public const string Surface = "tls";

    /// <summary>The refusal reasons, in the order their counter series are started at 0.</summary>
    public static readonly IReadOnlyList<string> Reasons = [ClusterTls.Missing, ClusterTls.Untrusted];

    /// <summary>Cluster:Tls:* of this configuration: null when none is set; an <see cref="ArgumentException"/> naming the key and path when wrong.</summary>
    public static ClusterTls? FromConfiguration(IConfiguration config) =>
        ClusterTls.Load(config[ClusterTls.CertificatePathKey], config[ClusterTls.KeyPathKey], config[ClusterTls.CaPathKey]);

    /// <summary>
    /// When Cluster:Tls:* are set, the <see cref="Endpoint"/> endpoint of <paramref name="service"/> requires client
    /// certificates of the cluster CA, and the loaded <see cref="ClusterTls"/> is registered for the service's own clients.
    /// Loaded now, so a missing file, a key that is not the certificate's or a cleartext endpoint URL stops the start with
    /// its key and path. <paramref name="refusals"/> gives the service's counter of refused handshakes (called with the reason).
    /// </summary>
    public static ClusterTls? AddClusterTlsEndpoint(this IHostApplicationBuilder builder, string service, Func<IServiceProvider, Action<string>> refusals)
    {
        var config = builder.Configuration;
        var tls = FromConfiguration(config);
        if (tls is null) return null;

        string? url = config["Kestrel:Endpoints:grpc:Url"];
        if (string.IsNullOrWhiteSpace(url))
            throw new ArgumentException($"{ClusterTls.CertificatePathKey} is set, so {service} serves mutual TLS on the Kestrel endpoint " +
                $"'{Endpoint}', but Kestrel:Endpoints:grpc:Url is not set (expected https://<host>:<port>)");
        if (!url.StartsWith("https://", StringComparison.OrdinalIgnoreCase))
            throw new ArgumentException($"{ClusterTls.CertificatePathKey} is set, so {service} serves mutual TLS, but " +
                $"Kestrel:Endpoints:grpc:Url='{url}' is not an https:// URL (its clients then dial https:// too)");

        builder.Services.AddSingleton(tls);
        builder.Services.AddOptions<KestrelServerOptions>().Configure<IServiceProvider>((kestrel, services) =>
        {
            var logger = services.GetRequiredService<ILoggerFactory>().CreateLogger(typeof(ClusterTlsEndpoint).FullName!);
            var refused = refusals(services);
            var loader = kestrel.ConfigurationLoader
                ?? throw new InvalidOperationException($"Kestrel has no configuration loader: {service} must be built by WebApplication.CreateBuilder");
            logger.LogInformation("{Service} requires client certificates of the cluster CA on {Url}; it presents {Certificate}",
                service, url, ClusterTls.Describe(tls.Certificate));
            loader.Endpoint(Endpoint, endpoint => endpoint.ListenOptions.UseHttps(new TlsHandshakeCallbackOptions
            {
                // Per connection, so a refusal can name the peer. Kestrel adds ALPN (h2) itself.
                OnConnection = context => ValueTask.FromResult(ServerOptions(tls, service, context.Connection.RemoteEndPoint, refused, logger)),
            }));
        });
        return tls;
    }

    static SslServerAuthenticationOptions ServerOptions(ClusterTls tls, string service, EndPoint? remote, Action<string> refused, ILogger logger) => new()
    {
        ServerCertificateContext = tls.CertificateContext,
        ClientCertificateRequired = true,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        // Kestrel's own RequireCertificate refuses a missing certificate before any callback could count it, so the
        // whole decision is made here: no certificate, or one that does not chain to the cluster CA, ends the handshake.
        RemoteCertificateValidationCallback = (_, certificate, chain, _) =>
        {
            if (tls.CheckClient(certificate, chain) is not { } refusal) return true;
            refused(refusal.Reason);
            logger.LogWarning("Refused a TLS connection to {Service} from {Remote}: {Problem}", service, remote, refusal.Detail);
            return false;
        },
    };
}
