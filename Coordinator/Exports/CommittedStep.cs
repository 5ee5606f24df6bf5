// Whether a job's step is a committed checkpoint that an export or an evaluation can read; the refusal says why not.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Exports;

public static class CommittedStep
{
    /// <summary>Null when <paramref name="step"/> of the job is committed and not deleted; else the refusal and its reason.</summary>
    public static (ExportRefusal Kind, string Reason)? Check(JobStatus status, string jobId, long step)
    {
        if (status.Spec is null) return (ExportRefusal.NotFound, $"no job '{jobId}'");
        string committed = string.Join(", ", status.Committed.Where(c => c.DeletedAt is null).Select(c => c.Step)) is { Length: > 0 } list ? list : "none";
        return status.Committed.FirstOrDefault(c => c.Step == step) switch
        {
            null when status.Checkpoints.Any(c => c.Step == step) => (ExportRefusal.Conflict,
                $"step {step} of job '{jobId}' is not committed (its checkpoint files were reported, the store has not committed them); committed steps: {committed}"),
            null => (ExportRefusal.NotFound, $"job '{jobId}' has no checkpoint at step {step}; committed steps: {committed}"),
            { DeletedAt: { } deleted } => (ExportRefusal.Conflict,
                $"the checkpoint at step {step} of job '{jobId}' was deleted by retention (keepLast) at {deleted:u}; committed steps: {committed}"),
            _ => null,
        };
    }
}
