// The coordinator-side actor of one worker process (key: worker id).
namespace DeepSeekCluster.Contracts.Grains;

public interface IGpuWorkerGrain : IGrainWithStringKey
{
    /// <summary>
    /// A worker process connected: records its capabilities, marks it online and free, and returns the connection number
    /// that <see cref="DisconnectedAsync"/> must name (so the close of an old connection cannot unregister a new one).
    /// </summary>
    /// <remarks>
    /// A process that says it is still training <paramref name="training"/> (job, generation, rank), e.g. after a
    /// Coordinator restart, is re-adopted when that is still its current assignment (the observer is told, nothing
    /// re-forms); otherwise the old assignment is lost and its job hears that the worker left.
    /// </remarks>
    Task<long> RegisterAsync(WorkerCapabilities capabilities, IWorkerControlObserver? observer, TrainingPosition? training = null);

    /// <summary>
    /// Liveness and metrics; throws <see cref="StaleGenerationException"/> when the worker holds another generation (with
    /// Rejoin set when the worker is a zombie: offline here, or reporting a generation it no longer belongs to).
    /// </summary>
    Task HeartbeatAsync(long generation, WorkerMetrics metrics);

    /// <summary>Stores the assignment and pushes it down to the process.</summary>
    Task AssignAsync(Assignment assignment);

    /// <summary>Pushes a command down; Stop ends the current assignment.</summary>
    Task CommandAsync(ControlCommand command);

    /// <summary>The process's stream closed (after Leaving: <see cref="LeaveKind.Left"/>, else Lost); the worker goes offline and its job is told.</summary>
    Task DisconnectedAsync(long connection, string reason, LeaveKind kind);

    /// <summary>Asks the process to leave gracefully (finish its step, say Leaving, exit); false when it is not online.</summary>
    Task<bool> LeaveAsync(string reason);

    /// <summary>The process put a job's model into the store (rank 0, after the last step; <paramref name="path"/> is its place there); GET /workers shows it.</summary>
    Task ModelSavedAsync(string jobId, long step, string path);

    /// <summary>Pushes an export order down to the process (held for it in the registry); false when it is not online.</summary>
    Task<bool> OrderExportAsync(ExportOrder order);

    /// <summary>Pushes a share of an evaluation down to the process (held for it in the registry); false when it is not online.</summary>
    Task<bool> OrderEvaluationAsync(EvaluationOrder order);

    Task<WorkerStatus> GetAsync();
}

/// <summary>The channel from a worker grain down to the gRPC stream of its process (wherever that stream lives).</summary>
public interface IWorkerControlObserver : IGrainObserver
{
    Task AssignedAsync(Assignment assignment);

    Task CommandedAsync(ControlCommand command);

    /// <summary>The process's current assignment was re-adopted after it reconnected: reports route to its job again.</summary>
    Task AdoptedAsync(Assignment assignment);

    /// <summary>The process is to export a committed checkpoint (REST POST /jobs/{id}/exports).</summary>
    Task ExportOrderedAsync(ExportOrder order);

    /// <summary>The process is to score its share of an evaluation (REST POST /evaluations).</summary>
    Task EvaluationOrderedAsync(EvaluationOrder order);
}

/// <summary>What a reconnecting worker says it is training.</summary>
[GenerateSerializer, Immutable]
public sealed record TrainingPosition([property: Id(0)] string JobId, [property: Id(1)] long Generation, [property: Id(2)] int Rank);
