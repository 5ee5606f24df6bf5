// Defaults every service adds: OpenTelemetry (logs, traces, metrics), Prometheus /metrics, /health + /alive,
// service discovery and resilience for outgoing HTTP. Not application logic: each service adds its own after this.
//
// HTTP/2 and HTTP/1.1 on cleartext. gRPC without TLS needs an endpoint whose Protocols is Http2 (prior-knowledge
// h2c); Kestrel's Http1AndHttp2 on a cleartext endpoint serves HTTP/1.1 only (it negotiates HTTP/2 through TLS
// ALPN, never by prior knowledge), while Prometheus scrapers and Kubernetes httpGet probes speak HTTP/1.1. So a
// service that serves gRPC without TLS listens on two named Kestrel endpoints, set by configuration alone:
//     Kestrel__Endpoints__grpc__Url=http://+:P1   Kestrel__Endpoints__grpc__Protocols=Http2
//     Kestrel__Endpoints__http__Url=http://+:P2   Kestrel__Endpoints__http__Protocols=Http1
// /metrics, /health and /alive are mapped on every endpoint, so probes and scrapers use "http" and gRPC clients
// use "grpc". With mutual TLS (Cluster:Tls:*, ClusterTlsEndpoint.cs) "grpc" serves https and requires client
// certificates, while "http" stays cleartext, since probes and scrapers present none. Only Kestrel:Endpoints is used
// for this: HTTP_PORTS/ASPNETCORE_URLS cannot carry a per-endpoint protocol, and any endpoint added in code would
// make Kestrel ignore them.
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Logging;
using OpenTelemetry;
using OpenTelemetry.Metrics;
using OpenTelemetry.Trace;

namespace Microsoft.Extensions.Hosting;

public static class ServiceDefaultsExtensions
{
    const string LiveTag = "live";

    /// <summary>Meters and activity sources of this project: every name that starts with this prefix is exported.</summary>
    public const string TelemetryPrefix = "DeepSeekCluster";

    /// <summary>Everything: telemetry, health, service discovery, and resilience on every HttpClient (gRPC clients from the factory included).</summary>
    public static TBuilder AddServiceDefaults<TBuilder>(this TBuilder builder) where TBuilder : IHostApplicationBuilder
    {
        builder.AddBasicServiceDefaults();
        builder.Services.AddServiceDiscovery();
        builder.Services.ConfigureHttpClientDefaults(http =>
        {
            http.AddStandardResilienceHandler();
            http.AddServiceDiscovery();
        });
        return builder;
    }

    /// <summary>Telemetry and health only: for processes whose outgoing calls must not be retried or redirected.</summary>
    public static TBuilder AddBasicServiceDefaults<TBuilder>(this TBuilder builder) where TBuilder : IHostApplicationBuilder
    {
        builder.ConfigureOpenTelemetry();
        builder.AddDefaultHealthChecks();
        return builder;
    }

    public static TBuilder ConfigureOpenTelemetry<TBuilder>(this TBuilder builder) where TBuilder : IHostApplicationBuilder
    {
        builder.Logging.AddOpenTelemetry(logging =>
        {
            logging.IncludeFormattedMessage = true;
            logging.IncludeScopes = true;
        });

        builder.Services.AddOpenTelemetry()
            .WithMetrics(metrics => metrics
                .AddAspNetCoreInstrumentation()
                .AddHttpClientInstrumentation()
                .AddRuntimeInstrumentation()
                .AddProcessInstrumentation()
                .AddMeter("Microsoft.Orleans")
                .AddMeter(TelemetryPrefix + "*")
                .AddPrometheusExporter())
            .WithTracing(tracing => tracing
                .AddSource(builder.Environment.ApplicationName)
                .AddSource(TelemetryPrefix + "*")
                .AddSource("Microsoft.Orleans.Runtime", "Microsoft.Orleans.Application")
                // Probes and scrapes every few seconds would drown the real traces.
                .AddAspNetCoreInstrumentation(o => o.Filter = ctx => !IsInfrastructurePath(ctx.Request.Path))
                .AddGrpcClientInstrumentation()
                .AddHttpClientInstrumentation());

        // OTLP only where a collector is configured (the AppHost or k8s set it); otherwise the exporter would retry into nothing.
        if (!string.IsNullOrWhiteSpace(builder.Configuration["OTEL_EXPORTER_OTLP_ENDPOINT"]))
            builder.Services.AddOpenTelemetry().UseOtlpExporter();
        return builder;
    }

    public static TBuilder AddDefaultHealthChecks<TBuilder>(this TBuilder builder) where TBuilder : IHostApplicationBuilder
    {
        // "self" only proves the process answers: liveness must not depend on anything outside it (not even Orleans
        // membership), or a partition would make Kubernetes restart every healthy process at once.
        builder.Services.AddHealthChecks().AddCheck("self", () => HealthCheckResult.Healthy(), [LiveTag]);
        return builder;
    }

    /// <summary>
    /// /metrics: Prometheus text format; /health: every check (readiness); /alive: only the live-tagged ones.
    /// Mapped in every environment because Kubernetes probes and Prometheus scrapes production too.
    /// </summary>
    public static WebApplication MapDefaultEndpoints(this WebApplication app)
    {
        app.MapPrometheusScrapingEndpoint("/metrics");
        app.MapHealthChecks("/health");
        app.MapHealthChecks("/alive", new HealthCheckOptions { Predicate = r => r.Tags.Contains(LiveTag) });
        return app;
    }

    static bool IsInfrastructurePath(Microsoft.AspNetCore.Http.PathString path) =>
        path.StartsWithSegments("/health") || path.StartsWithSegments("/alive") || path.StartsWithSegments("/metrics");
}
