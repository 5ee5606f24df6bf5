// Retries a blob call with exponential backoff on transient failures (unless the backend's client does), then gives up naming the storage.
using System.Diagnostics;
using System.Net.Sockets;
using Azure;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.CheckpointStore.Storage;

/// <summary>Blob storage did not answer after every try; the service reports it as gRPC Unavailable.</summary>
public sealed class BlobStorageUnavailableException(string message, Exception inner) : Exception(message, inner);

public sealed class BlobRetry(IBlobBackend backend, IOptions<StorageOptions> options, ILogger<BlobRetry> logger)
{
    private readonly StorageOptions _options = options.Value;

    public Task RunAsync(string what, Func<CancellationToken, Task> call, CancellationToken ct) =>
        RunAsync<bool>(what, async c => { await call(c); return true; }, ct);

    public async Task<T> RunAsync<T>(string what, Func<CancellationToken, Task<T>> call, CancellationToken ct)
    {
        var clock = Stopwatch.StartNew();
        // A backend whose client retries by itself has used every try by the time its error comes back here.
        int ownTries = backend.RetriesItself ? 1 : _options.RetryCount;
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                return await call(ct);
            }
            catch (Exception e) when (IsTransient(e, ct))
            {
                if (attempt >= ownTries)
                {
                    throw new BlobStorageUnavailableException(
                        $"Blob storage at {backend.Location} failed to {what} after {_options.RetryCount} tries over {clock.Elapsed.TotalSeconds:F1} s " +
                        $"(backoff {_options.RetryBaseDelayMs} ms doubling to at most {_options.RetryMaxDelayMs} ms): {Innermost(e).Message}", e);
                }
                var delay = _options.BackoffAfter(attempt);
                logger.LogWarning("Blob storage failed to {What} (try {Attempt} of {Tries}): {Error}; retrying in {Delay} ms",
                    what, attempt, ownTries, Innermost(e).Message, delay.TotalMilliseconds);
                await Task.Delay(delay, ct);
            }
        }
    }

    /// <summary>Network trouble and throttling/server errors are worth another try; a missing file, a refused permission or a bad request are not.</summary>
    internal static bool IsTransient(Exception e, CancellationToken ct) => e switch
    {
        OperationCanceledException => !ct.IsCancellationRequested, // a client timeout inside the SDK, not our caller giving up
        RequestFailedException r => r.Status is 0 or 408 or 429 or >= 500,
        AggregateException a => a.InnerExceptions.Count > 0 && a.InnerExceptions.All(i => IsTransient(i, ct)),
        HttpRequestException or SocketException or TimeoutException => true,
        FileNotFoundException or DirectoryNotFoundException or EndOfStreamException => false,
        IOException => true,
        _ => false,
    };

    private static Exception Innermost(Exception e) => e is AggregateException { InnerExceptions.Count: > 0 } a ? Innermost(a.InnerExceptions[^1]) : e;
}
