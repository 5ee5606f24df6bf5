// "Authorization: Bearer <key>" on /v1 (an API key or the cluster token) and /admin (the cluster token only).
using System.Security.Cryptography;
using System.Text;
using DeepSeekCluster.ModelServer.Api;
using DeepSeekCluster.ModelServer.Metrics;
using Microsoft.AspNetCore.Http;

namespace DeepSeekCluster.ModelServer.Hosting;

public sealed class ApiKeyCheck(ServingSettings settings, ServingMetrics metrics) : IMiddleware
{
    public async Task InvokeAsync(HttpContext http, RequestDelegate next)
    {
        var path = http.Request.Path;
        bool admin = path.StartsWithSegments("/admin");
        if (!admin && !path.StartsWithSegments("/v1")) { await next(http); return; }
        var header = http.Request.Headers.Authorization.ToString();
        string? presented = header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase) ? header["Bearer ".Length..].Trim() : null;
        bool cluster = presented is not null && settings.ClusterToken is not null && Same(presented, settings.ClusterToken);
        bool ok = admin ? cluster : cluster || (presented is not null && settings.ApiKeys.Any(k => Same(presented, k))) || settings.AllowAnonymous;
        if (ok) { await next(http); return; }
        metrics.Request("none", 401);
        await ApiError.Unauthorized(presented is null
            ? "no API key: send Authorization: Bearer <key> (a key from Serving:ApiKeys, or the cluster token)"
            : admin ? "the admin API takes the cluster token only (configuration Cluster:Token)" : "the API key is not valid").WriteAsync(http.Response);
    }

    /// <summary>Constant-time comparison, so the time of a refusal says nothing about the key.</summary>
    static bool Same(string a, string b) => CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(a), Encoding.UTF8.GetBytes(b));
}
