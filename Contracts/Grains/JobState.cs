// The job's life: Pending → Forming → Running ⇄ Rescaling → Completed | Failed | Stopped.
namespace DeepSeekCluster.Contracts.Grains;

public enum JobState
{
    /// <summary>Accepted, not yet looking for workers.</summary>
    Pending,
    /// <summary>Waiting for at least minWorkers free workers.</summary>
    Forming,
    Running,
    /// <summary>A worker left or joined; the worker set is re-forming under a new generation.</summary>
    Rescaling,
    Completed,
    Failed,
    Stopped,
}

public static class JobStates
{
    public static bool IsTerminal(this JobState s) => s is JobState.Completed or JobState.Failed or JobState.Stopped;
}
