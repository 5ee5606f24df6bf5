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

    /// <summary>A worker left (asked to), its stream broke (Lost) or its heartbeats stopped (Hung); the job re-forms under a new generation.</summary>
    [OneWay] Task WorkerLeftAsync(string workerId, string reason, LeaveKind kind);

    /// <summary>A report of <paramref name="what"/> from this worker in a stale generation was refused: recorded as worker_fenced.</summary>
    [OneWay] Task WorkerFencedAsync(string workerId, long reportedGeneration, string what);

    /// <summary>
    /// The registry needs this job's workers for a job of a higher priority: the members stop at their step boundary, the
    /// workers are released, and the job waits to re-form from its newest committed checkpoint. One-way (see above).
    /// </summary>
    [OneWay] Task PreemptAsync(string byJob, string reason);

    /// <summary>A decision of the registry about this job's claim for workers, recorded as a scheduling event. One-way.</summary>
    [OneWay] Task ScheduledAsync(string decision, string message);

    /// <summary>Rank 0 of the current generation resumed (from a replica, a checkpoint or the start). Fenced like steps.</summary>
    Task ReportResumedAsync(long generation, ResumedReport report);

    /// <summary>
    /// A member's collective failed in <paramref name="generation"/>: the job re-forms with the workers it has (a report of
    /// a generation already replaced is ignored: every rank of a broken ring reports).
    /// </summary>
    Task ReportCollectiveFailedAsync(long generation, string workerId, string reason);

    /// <summary>
    /// The first rank of a group (<paramref name="group"/>: the pipeline stage, 0 without stages) made the NCCL unique id
    /// of <paramref name="generation"/>'s communicator, or could not (<paramref name="id"/> empty, <paramref name="reason"/>
    /// says why): it is handed to the group's other ranks. Fenced like steps; another rank than the group's first is refused.
    /// </summary>
    Task ShareNcclUniqueIdAsync(long generation, int fromRank, int group, byte[] id, string reason);

    /// <summary>Progress of one rank; throws <see cref="StaleGenerationException"/> for any generation but the current one.</summary>
    Task ReportStepAsync(long generation, StepReport report);

    /// <summary>
    /// One rank's checkpoint file is uploaded; returns true when this completes the step's checkpoint, which the grain then
    /// hands to the CheckpointCommitter. Fenced like steps.
    /// </summary>
    Task<bool> ReportCheckpointAsync(long generation, CheckpointReport report);

    /// <summary>
    /// A rank could not store its file of the step's checkpoint, or skipped it (its previous save was still uploading): the
    /// step cannot commit from this generation, which becomes a checkpoint_not_committed event naming the rank and
    /// <paramref name="error"/> (a phrase: "could not store its file: …"); training goes on. Fenced like steps.
    /// </summary>
    Task ReportCheckpointFailedAsync(long generation, long step, int rank, string error);

    /// <summary>The CheckpointStore committed the step: it is listed in the status and a re-formation resumes from the newest.</summary>
    Task CheckpointCommittedAsync(CommittedCheckpoint checkpoint);

    /// <summary>Retention deleted these committed steps (and these uncommitted leftovers) from the store.</summary>
    Task CheckpointsDeletedAsync(long[] steps, long[] leftovers);

    /// <summary>The step stays uncommitted (the store refused it, or none is configured); the reason becomes a job event.</summary>
    Task CheckpointNotCommittedAsync(long generation, long step, string reason);

    /// <summary>The step guard skipped a step or rolled the live state back: a job event with its reason. Fenced like steps.</summary>
    Task ReportGuardAsync(long generation, GuardReport report);

    /// <summary>Something done with the job's checkpoints outside training (an export): a job event of <paramref name="kind"/>.</summary>
    Task RecordEventAsync(string kind, string message, string? reason);

    /// <summary>
    /// An evaluation job (POST /evaluations) scored committed <paramref name="step"/>: its scores join the job's
    /// (replacing those of the same step and task) and the event says so.
    /// </summary>
    Task RecordEvaluationAsync(long step, EvaluationScore[] scores, string message);

    /// <summary>A rank hit an error it cannot recover from; the job fails with that reason. Fenced like steps.</summary>
    Task FailAsync(long generation, string reason);
}
