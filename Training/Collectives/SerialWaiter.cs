// One long-lived thread that runs a collective's blocking waits in order: the NCCL backend waits for the device on it, so
// an operation costs no thread start (the "one persistent waiter, not a new thread per call").
using System.Collections.Concurrent;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// Runs each submitted wait on one background thread, in submission order; the caller gets a task and stays free to poll
/// (a watchdog, an abort). A wait that never returns holds every later one, which is what a collective wants: its
/// operations are ordered, and after a failure it refuses new ones anyway.
/// </summary>
public sealed class SerialWaiter : IDisposable
{
    readonly BlockingCollection<(Action Wait, TaskCompletionSource Done)> queue = new();
    readonly Thread thread;
    int disposed;

    public SerialWaiter(string name)
    {
        thread = new Thread(Loop) { IsBackground = true, Name = name };
        thread.Start();
    }

    /// <summary>The waiting thread's managed id (the same for every wait).</summary>
    public int ThreadId => thread.ManagedThreadId;

    /// <summary>Queues <paramref name="wait"/>; the task completes when it returns, or faults with what it threw.</summary>
    public Task Submit(Action wait)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try { queue.Add((wait, done)); }
        catch (InvalidOperationException) { throw new ObjectDisposedException(nameof(SerialWaiter), $"the waiter '{thread.Name}' was disposed"); }
        return done.Task;
    }

    void Loop()
    {
        foreach (var (wait, done) in queue.GetConsumingEnumerable())
        {
            try
            {
                wait();
                done.SetResult();
            }
            catch (Exception e) { done.SetException(e); }
        }
        queue.Dispose();
    }

    /// <summary>Takes no more waits; the thread ends after those queued (not joined: one may be stuck on a dead peer).</summary>
    public void Dispose()
    {
        // Once: the thread disposes the queue when it ends, after which CompleteAdding would throw.
        if (Interlocked.Exchange(ref disposed, 1) == 0) queue.CompleteAdding();
    }

    /// <summary>Whether the thread ended within <paramref name="timeout"/> (after <see cref="Dispose"/> and the queued waits).</summary>
    public bool Join(TimeSpan timeout) => thread.Join(timeout);
}
