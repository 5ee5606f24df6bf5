// How a training run stops: at the step boundary, and a collective that stays blocked is aborted rather than timed out.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// Two tokens. <see cref="Boundary"/> is cancelled at once and checked between steps, so the step in flight finishes.
/// <see cref="Abort"/> follows after a grace and disposes the run's collective (see <see cref="Guard"/>): a rank blocked in
/// an all-reduce whose peer is gone (or whose peers already began the next step) throws within a poll slice instead of
/// waiting out the collective timeout (30 s by default). It also ends a sample fetch the step waits for (RemoteSampleSource).
/// </summary>
public sealed class RunCancellation : IDisposable
{
    readonly CancellationTokenSource boundary = new(), abort = new();
    readonly Lock gate = new();
    Timer? timer;
    bool disposed;

    public CancellationToken Boundary => boundary.Token;
    public CancellationToken Abort => abort.Token;
    public bool IsCancellationRequested => boundary.IsCancellationRequested;
    public bool IsAborted => abort.IsCancellationRequested;

    /// <summary>Stops at the boundary; aborts the collective after <paramref name="grace"/> (zero: now). A shorter grace wins.</summary>
    public void Cancel(TimeSpan grace)
    {
        lock (gate)
        {
            if (disposed) return;
            boundary.Cancel();
            if (abort.IsCancellationRequested) return;
            if (grace <= TimeSpan.Zero) { abort.Cancel(); return; }
            if (timer is not null) return; // an abort is already scheduled
            timer = new Timer(_ => { lock (gate) if (!disposed) abort.Cancel(); }, null, grace, Timeout.InfiniteTimeSpan);
        }
    }

    /// <summary>Disposes <paramref name="collective"/> when the run is aborted; dispose the registration when the collective goes.</summary>
    public CancellationTokenRegistration Guard(ICollective collective) => abort.Token.Register(collective.Dispose);

    /// <summary>
    /// Forms the ring on a dedicated thread; a cancellation ends the wait at once and disposes the rendezvous (which
    /// frees the port for the next generation); the abandoned attempt then fails on its own and is cleaned up. A peer
    /// that refuses us because it still listens for its previous generation (it is finishing a step) is asked again
    /// with a fresh rendezvous until the collective timeout.
    /// </summary>
    public static TcpCollective ConnectRing(Func<TcpRendezvous> bind, IReadOnlyList<string> peers, TcpCollectiveOptions options, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + options.Timeout;
        while (true)
        {
            var rendezvous = bind();
            try { return ConnectRing(rendezvous, peers, options with { Timeout = Max(deadline - DateTime.UtcNow, TimeSpan.FromSeconds(1)) }, ct); }
            catch (CollectiveException e) when (e.Failure == CollectiveFailure.Refused && DateTime.UtcNow < deadline - TimeSpan.FromSeconds(1))
            {
                if (ct.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(250))) ct.ThrowIfCancellationRequested();
            }
        }
    }

    static TimeSpan Max(TimeSpan a, TimeSpan b) => a > b ? a : b;

    public static TcpCollective ConnectRing(TcpRendezvous rendezvous, IReadOnlyList<string> peers, TcpCollectiveOptions options, CancellationToken ct)
    {
        try { return TrainingThread.Connect(() => rendezvous.Connect(peers, options), ct); }
        catch
        {
            rendezvous.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        lock (gate)
        {
            disposed = true;
            timer?.Dispose();
        }
        boundary.Dispose();
        abort.Dispose();
    }
}
