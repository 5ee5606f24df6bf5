// Submitting a job the same way from REST and gRPC: validate, pick an id, hand it to the job grain.
using System.Security.Cryptography;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public sealed class JobSubmission(IGrainFactory grains, TimeProvider clock)
{
    public abstract record Outcome;
    public sealed record Accepted(JobStatus Status) : Outcome;
    public sealed record Invalid(IReadOnlyList<SpecProblem> Problems) : Outcome;
    public sealed record Conflict(string Message) : Outcome;

    public async Task<Outcome> SubmitAsync(JobSpec spec)
    {
        var problems = spec.Validate();
        if (problems.Count > 0) return new Invalid(problems);
        string id = string.IsNullOrWhiteSpace(spec.Name)
            ? $"job-{clock.GetUtcNow():yyyyMMdd-HHmmss}-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(3))}"
            : spec.Name;
        try { return new Accepted(await grains.GetGrain<ITrainingJobGrain>(id).SubmitAsync(spec)); }
        catch (JobSpecInvalidException e) { return new Invalid(e.Problems); }
        catch (InvalidOperationException e) { return new Conflict(e.Message); }
    }

    /// <summary>The job's status, or null when no job has that id.</summary>
    public async Task<JobStatus?> GetAsync(string id)
    {
        if (!JobSpec.IsValidName(id)) return null;
        var status = await grains.GetGrain<ITrainingJobGrain>(id).GetStatusAsync();
        return status.Spec is null ? null : status;
    }

    public static Dictionary<string, string[]> ByField(IReadOnlyList<SpecProblem> problems) =>
        problems.GroupBy(p => p.Field).ToDictionary(g => g.Key, g => g.Select(p => p.Message).ToArray());
}
