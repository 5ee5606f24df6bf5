// The coordinator-side actor of one worker process (key: worker id).
namespace DeepSeekCluster.Contracts.Grains;

public interface IGpuWorkerGrain : IGrainWithStringKey
{
    /// <summary>
    /// A worker process connected: records its capabilities, marks it online and free, and returns the connection number
    /// that <see cref="DisconnectedAsync"/> must name (so the close of an old connection cannot unregister a new one).
    /// </summary>
    Task<long> RegisterAsync(WorkerCapabilities capabilities, IWorkerControlObserver? observer);

    /// <summary>Liveness and metrics; throws <see cref="StaleGenerationException"/> when the worker holds another generation.</summary>
    Task HeartbeatAsync(long generation, WorkerMetrics metrics);

    /// <summary>Stores the assignment and pushes it down to the process.</summary>
    Task AssignAsync(Assignment assignment);

    /// <summary>Pushes a command down; Stop ends the current assignment.</summary>
    Task CommandAsync(ControlCommand command);

    /// <summary>The process's stream closed; the worker goes offline and its job is told it left.</summary>
    Task DisconnectedAsync(long connection, string reason);

    Task<WorkerStatus> GetAsync();
}

/// <summary>The channel from a worker grain down to the gRPC stream of its process (wherever that stream lives).</summary>
public interface IWorkerControlObserver : IGrainObserver
{
    Task AssignedAsync(Assignment assignment);

    Task CommandedAsync(ControlCommand command);
}
