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
}
