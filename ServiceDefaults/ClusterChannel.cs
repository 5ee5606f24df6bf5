// The client side of the cluster's mutual TLS: a gRPC channel to a cluster service (DataShardService, CheckpointStore)
// that presents this process's certificate and trusts only the cluster CA when Cluster:Tls:* are set, and is the
// plain h2c channel it always was when they are not.
using Grpc.Net.Client;

namespace DeepSeekCluster.ServiceDefaults;

public static class ClusterChannel
{
    /// <summary>
    /// Null when <paramref name="address"/> suits <paramref name="tls"/>, else why not, naming <paramref name="addressKey"/>:
    /// with certificates the address must be https:// (a certificate that would go unused over cleartext is a mistake).
    /// </summary>
    public static string? Problem(Uri address, ClusterTls? tls, string addressKey) =>
        tls is not null && address.Scheme != Uri.UriSchemeHttps
            ? $"{addressKey}='{address}' must be an https:// address when Cluster:Tls:* (Cluster__Tls__*) are set: the service then serves mutual TLS"
            : null;

    /// <summary>
    /// A channel to <paramref name="address"/>. With <paramref name="tls"/> it presents this process's certificate and
    /// accepts only a server certificate of the cluster CA naming the host dialled; without it nothing is added. With
    /// <paramref name="token"/> every call carries "authorization: Bearer &lt;token&gt;", which DataShardService and
    /// CheckpointStore require (ClusterTokenGate) as ClusterControl does.
    /// </summary>
    public static GrpcChannel For(Uri address, ClusterTls? tls, string addressKey, GrpcChannelOptions? options = null, string? token = null)
    {
        if (Problem(address, tls, addressKey) is { } problem) throw new ArgumentException(problem);
        options ??= new GrpcChannelOptions();
        if (tls is not null || !string.IsNullOrEmpty(token))
        {
            if (options.HttpHandler is not null) throw new ArgumentException("ClusterChannel.For sets the HTTP handler itself when Cluster:Tls:* or a token are given", nameof(options));
            // What GrpcChannel would create by itself, plus the certificate and the trust of the cluster CA alone.
            HttpMessageHandler handler = new SocketsHttpHandler { EnableMultipleHttp2Connections = true, SslOptions = tls?.ClientOptions() ?? new() };
            if (!string.IsNullOrEmpty(token)) handler = new BearerToken(token) { InnerHandler = handler };
            options.HttpHandler = handler;
        }
        return GrpcChannel.ForAddress(address, options);
    }

    /// <summary>A header on the HTTP request rather than gRPC call credentials: those are refused on cleartext channels.</summary>
    sealed class BearerToken(string token) : DelegatingHandler
    {
        readonly System.Net.Http.Headers.AuthenticationHeaderValue header = new("Bearer", token);

        protected override Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            request.Headers.Authorization = header;
            return base.SendAsync(request, cancellationToken);
        }
    }
}
