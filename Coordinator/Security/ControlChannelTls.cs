// Mutual TLS on ClusterControl, when Cluster:Tls:* name the certificate files: the "grpc" Kestrel endpoint (workers
// and services) serves HTTPS and requires a client certificate that chains to the cluster CA; anything else is refused
// in the handshake, logged and counted. The "http" endpoint stays cleartext: kubelet probes and Prometheus scrape it,
// and its writes still require the cluster token. Without the keys nothing changes (cleartext h2c + token).
using System.Net;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;

namespace DeepSeekCluster.Coordinator.Security;

public static class ControlChannelTls
{
    /// <summary>The Kestrel endpoint that serves ClusterControl (ServiceDefaults' two-endpoint layout).</summary>
    public const string Endpoint = "grpc";

    /// <summary>The refusal counter's surface for a refused handshake.</summary>
    public const string Surface = "tls";

    public static IHostApplicationBuilder AddControlChannelTls(this IHostApplicationBuilder builder)
    {
        var config = builder.Configuration;
        // Loaded now, so a missing file or a key that is not the certificate's stops the start with its key and path.
        var tls = ClusterTls.Load(config[ClusterTls.CertificatePathKey], config[ClusterTls.KeyPathKey], config[ClusterTls.CaPathKey]);
        if (tls is null) return builder;

        string? url = config["Kestrel:Endpoints:grpc:Url"];
        if (string.IsNullOrWhiteSpace(url))
            throw new ArgumentException($"{ClusterTls.CertificatePathKey} is set, so ClusterControl serves mutual TLS on the Kestrel endpoint " +
                $"'{Endpoint}', but Kestrel:Endpoints:grpc:Url is not set (expected https://<host>:<port>)");
        if (!url.StartsWith("https://", StringComparison.OrdinalIgnoreCase))
            throw new ArgumentException($"{ClusterTls.CertificatePathKey} is set, so ClusterControl serves mutual TLS, but " +
                $"Kestrel:Endpoints:grpc:Url='{url}' is not an https:// URL (workers then dial https:// too)");

        builder.Services.AddSingleton(tls);
        builder.Services.AddOptions<KestrelServerOptions>().Configure<CoordinatorMetrics, ILoggerFactory>((kestrel, metrics, logs) =>
        {
            var logger = logs.CreateLogger(typeof(ControlChannelTls).FullName!);
            var loader = kestrel.ConfigurationLoader
                ?? throw new InvalidOperationException("Kestrel has no configuration loader: the Coordinator must be built by WebApplication.CreateBuilder");
            logger.LogInformation("ClusterControl requires client certificates of the cluster CA on {Url}; this silo presents {Certificate}",
                url, ClusterTls.Describe(tls.Certificate));
            loader.Endpoint(Endpoint, endpoint => endpoint.ListenOptions.UseHttps(new TlsHandshakeCallbackOptions
            {
                // Per connection, so a refusal can name the peer. Kestrel adds ALPN (h2) itself.
                OnConnection = context => ValueTask.FromResult(ServerOptions(tls, context.Connection.RemoteEndPoint, metrics, logger)),
            }));
        });
        return builder;
    }

    static SslServerAuthenticationOptions ServerOptions(ClusterTls tls, EndPoint? remote, CoordinatorMetrics metrics, ILogger logger) => new()
    {
        ServerCertificateContext = tls.CertificateContext,
        ClientCertificateRequired = true,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        // Kestrel's own RequireCertificate refuses a missing certificate before any callback could count it, so the
        // whole decision is made here: no certificate, or one that does not chain to the cluster CA, ends the handshake.
        RemoteCertificateValidationCallback = (_, certificate, chain, _) =>
        {
            if (tls.CheckClient(certificate, chain) is not { } refusal) return true;
            metrics.AuthRefused(Surface, refusal.Reason);
            logger.LogWarning("Refused a TLS connection to ClusterControl from {Remote}: {Problem}", remote, refusal.Detail);
            return false;
        },
    };
}
