// Coordinator settings (section "Coordinator"), validated at start.
using System.ComponentModel.DataAnnotations;

namespace DeepSeekCluster.Coordinator;

public sealed class CoordinatorOptions : IValidatableObject
{
    public const string Section = "Coordinator";

    /// <summary>A worker without a heartbeat for this long has left (workers beat every second).</summary>
    public TimeSpan HeartbeatTimeout { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// After the Coordinator (re)starts, how long a worker that was online has to reconnect before its job hears that it
    /// left (workers reconnect with a backoff of up to 5 s).
    /// </summary>
    public TimeSpan ReconnectGrace { get; set; } = TimeSpan.FromSeconds(20);

    /// <summary>Where grain state lives when no Redis is configured, so a restart loses nothing.</summary>
    public string StateFolder { get; set; } = "./.data/coordinator";

    /// <summary>Loss points kept per job (the oldest go first).</summary>
    public int LossHistory { get; set; } = 5000;

    /// <summary>Per tenant (Coordinator:Quotas:&lt;tenant&gt;), the most workers its jobs hold together; a tenant not named has no limit.</summary>
    public Dictionary<string, int> Quotas { get; set; } = new(StringComparer.Ordinal);

    /// <summary>
    /// How long a preempted job may take to save and commit a checkpoint at its current step before its workers go
    /// without one (it then redoes the steps after its newest committed checkpoint); zero: release at once, no checkpoint.
    /// </summary>
    public TimeSpan PreemptionCheckpointTimeout { get; set; } = TimeSpan.FromSeconds(60);

    public IEnumerable<ValidationResult> Validate(ValidationContext context)
    {
        if (HeartbeatTimeout <= TimeSpan.Zero)
            yield return new($"{Section}:HeartbeatTimeout must be positive (a TimeSpan such as 00:00:05), not {HeartbeatTimeout}", [nameof(HeartbeatTimeout)]);
        if (ReconnectGrace < TimeSpan.Zero)
            yield return new($"{Section}:ReconnectGrace must not be negative (a TimeSpan such as 00:00:20), not {ReconnectGrace}", [nameof(ReconnectGrace)]);
        if (PreemptionCheckpointTimeout < TimeSpan.Zero)
            yield return new($"{Section}:PreemptionCheckpointTimeout must not be negative (a TimeSpan such as 00:01:00; zero: no checkpoint at preemption), not {PreemptionCheckpointTimeout}", [nameof(PreemptionCheckpointTimeout)]);
        if (string.IsNullOrWhiteSpace(StateFolder))
            yield return new($"{Section}:StateFolder must name a folder", [nameof(StateFolder)]);
        if (LossHistory < 1)
            yield return new($"{Section}:LossHistory must be at least 1, not {LossHistory}", [nameof(LossHistory)]);
        foreach (var (tenant, quota) in Quotas)
            if (quota < 0 || !Contracts.Grains.JobSpec.IsValidName(tenant))
                yield return new($"{Section}:Quotas:{tenant} must name a tenant (1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.') and a worker count of 0 or more, not {quota}", [nameof(Quotas)]);
    }
}
