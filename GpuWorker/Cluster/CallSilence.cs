// The silence bound of one gRPC call to a service (the checkpoint store, the export store, the data service): a call
// that sees no sign of progress for a while is given up. Not a deadline on the call's length: a long transfer that keeps
// moving never expires.
using Grpc.Core;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// Its token is the caller's, cancelled also when <see cref="Progress"/> was not called for the timeout (an answer, a
/// message of a stream, a chunk the service took in); <see cref="Expired"/> tells that cancel from the caller's own.
/// </summary>
sealed class CallSilence : IDisposable
{
    /// <summary>
    /// What the worker's services get by default: far above any answer, message or chunk they take to send or take in
    /// on a loaded machine (seconds), so only a service that stopped answering reaches it.
    /// </summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(60);

    readonly CancellationTokenSource cts;
    readonly CancellationToken caller;
    readonly TimeSpan timeout;

    public CallSilence(TimeSpan timeout, CancellationToken caller)
    {
        (this.timeout, this.caller) = (timeout, caller);
        cts = CancellationTokenSource.CreateLinkedTokenSource(caller);
        cts.CancelAfter(timeout);
    }

    public CancellationToken Token => cts.Token;
    public bool Expired => cts.IsCancellationRequested && !caller.IsCancellationRequested;
    /// <summary>Whether <paramref name="e"/> is how the call ended when this silence cut it (the filter of the callers' catch).</summary>
    public bool Ended(Exception e) => Expired && e is RpcException or OperationCanceledException;
    /// <summary>Sending (the service is silent by taking nothing in), not waiting for an answer: for the message.</summary>
    public bool Uploading { get; set; }
    /// <summary>"answered" or "took in", for the message.</summary>
    public string Verb => Uploading ? "took in" : "answered";

    /// <summary>A sign of progress: the timeout starts again.</summary>
    public void Progress()
    {
        if (!cts.IsCancellationRequested) cts.CancelAfter(timeout);
    }

    public void Dispose() => cts.Dispose();
}
