// Write endpoints need "Authorization: Bearer <cluster token>"; a refusal is logged (never the presented value) and counted.
namespace DeepSeekCluster.Coordinator.Api;

public sealed class RequireClusterToken(ClusterToken token, CoordinatorMetrics metrics, ILogger<RequireClusterToken> logger) : IEndpointFilter
{
    public async ValueTask<object?> InvokeAsync(EndpointFilterInvocationContext context, EndpointFilterDelegate next)
    {
        var http = context.HttpContext;
        string? presented = ClusterToken.FromAuthorization(http.Request.Headers.Authorization.ToString() is { Length: > 0 } h ? h : null);
        if (token.Matches(presented)) return await next(context);

        string reason = presented is null ? "missing" : "wrong";
        metrics.AuthRefused("rest", reason);
        logger.LogWarning("Refused {Method} {Path} from {Remote}: {Reason} cluster token", http.Request.Method, http.Request.Path, http.Connection.RemoteIpAddress, reason);
        http.Response.Headers.WWWAuthenticate = "Bearer";
        return Results.Problem(statusCode: StatusCodes.Status401Unauthorized, title: "cluster token required",
            detail: "send Authorization: Bearer <cluster token> (configuration Cluster:Token)");
    }
}
