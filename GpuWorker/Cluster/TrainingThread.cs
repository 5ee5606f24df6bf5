// The one place the worker blocks on a task. A generation's run is synchronous by nature: TorchSharp's steps and the
// collectives block the thread they run on, so ClusterWorker gives each run a dedicated (LongRunning) thread, and the
// few asynchronous calls the run needs (a checkpoint load or upload, a sample window in flight) are waited for here.
namespace DeepSeekCluster.GpuWorker.Cluster;

static class TrainingThread
{
    /// <summary>
    /// Waits for <paramref name="task"/> on the run's own thread and returns its result; its exception surfaces as itself
    /// (not an AggregateException), so the run's handlers classify it as they would an awaited one.
    /// </summary>
    public static T Wait<T>(Task<T> task) => task.GetAwaiter().GetResult();

    /// <inheritdoc cref="Wait{T}(Task{T})"/>
    public static void Wait(Task task) => task.GetAwaiter().GetResult();

    /// <inheritdoc cref="Wait{T}(Task{T})"/>
    public static void Wait(ValueTask task) => task.AsTask().GetAwaiter().GetResult();

    /// <summary>
    /// Runs <paramref name="connect"/> (a blocking connection: a ring, pipeline links) on a thread of its own and waits
    /// for it until <paramref name="ct"/> is cancelled: then OperationCanceledException at once, and a connection that
    /// completes later is disposed. Its exception surfaces as itself.
    /// </summary>
    public static T Connect<T>(Func<T> connect, CancellationToken ct) where T : IDisposable
    {
        var connecting = Task.Factory.StartNew(connect, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        try { return connecting.WaitAsync(ct).GetAwaiter().GetResult(); }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            _ = connecting.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); else _ = t.Exception; }, TaskScheduler.Default);
            throw;
        }
    }

    /// <summary>Waits for <paramref name="task"/> at most <paramref name="timeout"/>; false when it did not complete by then. A cancel throws.</summary>
    public static bool TryWait<T>(Task<T> task, TimeSpan timeout, CancellationToken ct, out T result)
    {
        try
        {
            result = task.WaitAsync(timeout, ct).GetAwaiter().GetResult();
            return true;
        }
        catch (TimeoutException)
        {
            result = default!;
            return false;
        }
    }

    /// <summary>Waits until <paramref name="task"/> has ended, whatever its outcome (a call being abandoned).</summary>
    public static void WaitEnded(Task task)
    {
        try { task.GetAwaiter().GetResult(); }
        catch (Exception) { } // its outcome is not wanted, only its end
    }
}
