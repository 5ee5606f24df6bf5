// The cluster token on the storage services' gRPC calls (DataShardService, CheckpointStore): every call must carry
// "authorization: Bearer <Cluster:Token>", the header the Coordinator's ClusterControl already requires. Not TLS: the token
// proves membership, the mutual TLS of ClusterTlsEndpoint (when configured) protects the channel; both apply together.
using System.Security.Cryptography;
using System.Text;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.ServiceDefaults;

/// <summary>
/// Server side: refuses a call without the token (Unauthenticated), logs the peer and counts the refusal by reason
/// (<see cref="Missing"/> or <see cref="Wrong"/>) with the surface label <see cref="Surface"/>. Without Cluster:Token
/// configured the gate is open and says so at start (the AppHost and every manifest set it; a bare `dotnet run` does not).
/// </summary>
public sealed class ClusterTokenGate : Interceptor
{
    public const string ConfigKey = "Cluster:Token";

    /// <summary>The refusal counters' surface label for a refused call.</summary>
    public const string Surface = "grpc";

    public const string Missing = "missing";
    public const string Wrong = "wrong";

    /// <summary>The refusal reasons, in the order their counter series are started at 0.</summary>
    public static readonly IReadOnlyList<string> Reasons = [Missing, Wrong];

    readonly byte[]? token;
    readonly string service;
    readonly Action<string> refused;
    readonly ILogger logger;

    ClusterTokenGate(string? token, string service, Action<string> refused, ILogger logger)
    {
        this.token = string.IsNullOrEmpty(token) ? null : Encoding.UTF8.GetBytes(token);
        (this.service, this.refused, this.logger) = (service, refused, logger);
    }

    /// <summary>Whether calls are checked at all (Cluster:Token is set).</summary>
    public bool Enforced => token is not null;

    /// <summary>
    /// Registers the gate of <paramref name="service"/>; the service adds it to its gRPC interceptors
    /// (<c>AddGrpc(o => o.Interceptors.Add&lt;ClusterTokenGate&gt;())</c>). <paramref name="refusals"/> gives the
    /// service's counter of refused calls (called with the reason).
    /// </summary>
    public static void AddClusterTokenGate(IHostApplicationBuilder builder, string service, Func<IServiceProvider, Action<string>> refusals)
    {
        string? configured = builder.Configuration[ConfigKey];
        builder.Services.AddSingleton(sp =>
        {
            var logger = sp.GetRequiredService<ILoggerFactory>().CreateLogger<ClusterTokenGate>();
            var gate = new ClusterTokenGate(string.IsNullOrWhiteSpace(configured) ? null : configured, service, refusals(sp), logger);
            if (!gate.Enforced)
                logger.LogWarning("{Key} is not set: {Service} accepts gRPC calls from any caller. Set it (Cluster__Token) wherever " +
                    "other processes can reach this one; the AppHost and the Kubernetes manifests do", ConfigKey, service);
            return gate;
        });
    }

    /// <summary>Null when the call may proceed; otherwise the refusal reason (already logged and counted).</summary>
    string? Check(ServerCallContext context)
    {
        if (token is null) return null;
        string? header = context.RequestHeaders.GetValue("authorization");
        string? presented = header is not null && header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase) ? header["Bearer ".Length..].Trim() : null;
        // Constant time, so the time to refuse says nothing about the token.
        if (presented is not null && CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(presented), token)) return null;
        string reason = presented is null ? Missing : Wrong;
        refused(reason);
        logger.LogWarning("Refused {Method} on {Service} from {Peer}: {Reason} cluster token", context.Method, service, context.Peer, reason);
        return reason;
    }

    static RpcException Refusal() => new(new Status(StatusCode.Unauthenticated, "cluster token missing or wrong: send authorization: Bearer <Cluster:Token>"));

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation) =>
        Check(context) is null ? continuation(request, context) : throw Refusal();

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context,
        ClientStreamingServerMethod<TRequest, TResponse> continuation) =>
        Check(context) is null ? continuation(requestStream, context) : throw Refusal();

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context,
        ServerStreamingServerMethod<TRequest, TResponse> continuation) =>
        Check(context) is null ? continuation(request, responseStream, context) : throw Refusal();

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation) =>
        Check(context) is null ? continuation(requestStream, responseStream, context) : throw Refusal();
}
