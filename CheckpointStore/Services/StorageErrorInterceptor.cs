// Turns storage failures that escape a call into gRPC statuses whose message names the storage and the operation.
using DeepSeekCluster.CheckpointStore.Storage;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace DeepSeekCluster.CheckpointStore.Services;

public sealed class StorageErrorInterceptor(ILogger<StorageErrorInterceptor> logger) : Interceptor
{
    public override async Task<TResponse> UnaryServerHandler<TRequest, TResponse>(
        TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        try { return await continuation(request, context); }
        catch (Exception e) when (Map(e, context) is { } mapped) { throw mapped; }
    }

    public override async Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(
        IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try { return await continuation(requestStream, context); }
        catch (Exception e) when (Map(e, context) is { } mapped) { throw mapped; }
    }

    public override async Task ServerStreamingServerHandler<TRequest, TResponse>(
        TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try { await continuation(request, responseStream, context); }
        catch (Exception e) when (Map(e, context) is { } mapped) { throw mapped; }
    }

    private RpcException? Map(Exception e, ServerCallContext context)
    {
        if (e is RpcException || context.CancellationToken.IsCancellationRequested) return null;
        var status = e switch
        {
            BlobStorageUnavailableException => new Status(StatusCode.Unavailable, e.Message),
            UnauthorizedAccessException => new Status(StatusCode.Unavailable, $"Blob storage refused access: {e.Message}"),
            IOException => new Status(StatusCode.Unavailable, $"Blob storage failed: {e.Message}"),
            Azure.RequestFailedException r => new Status(StatusCode.Unavailable, $"Blob storage failed ({r.Status} {r.ErrorCode}): {r.Message}"),
            _ => (Status?)null,
        };
        if (status is null) return null;
        logger.LogError(e, "{Method} failed: {Message}", context.Method, status.Value.Detail);
        return new RpcException(status.Value);
    }
}
