// One training job (key: job id): its state machine, generations, ranks and checkpoints.
using Orleans.Concurrency;

namespace DeepSeekCluster.Contracts.Grains;

public interface ITrainingJobGrain : IGrainWithStringKey
{
    /// <summary>Accepts a spec (throws <see cref="JobSpecInvalidException"/> listing every problem) and starts forming.</summary>
    Task<JobStatus> SubmitAsync(JobSpec spec);

    /// <summary>State, generation, step, loss history, workers, checkpoints and events.</summary>
    Task<JobStatus> GetStatusAsync();

    /// <summary>Stops the job and tells every worker to stop; a finished job stays as it is.</summary>
    Task<JobStatus> StopAsync();

    /// <summary>A worker became free; the job may form or grow. One-way so the registry never waits on a job.</summary>
    [OneWay] Task WorkerJoinedAsync(string workerId);

    /// <summary>A worker's stream closed or its heartbeats stopped; the job re-forms under a new generation.</summary>
    [OneWay] Task WorkerLeftAsync(string workerId, string reason);

    /// <summary>Progress of one rank; throws <see cref="StaleGenerationException"/> for any generation but the current one.</summary>
    Task ReportStepAsync(long generation, StepReport report);

    /// <summary>One rank's checkpoint file is uploaded; returns true when this completes the step's checkpoint. Fenced like steps.</summary>
    Task<bool> ReportCheckpointAsync(long generation, CheckpointReport report);

    /// <summary>A rank hit an error it cannot recover from; the job fails with that reason. Fenced like steps.</summary>
    Task FailAsync(long generation, string reason);
}
