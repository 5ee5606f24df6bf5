// How long a job took to recover from a re-formation: cause → formed → resumed → first step. Times only; it decides nothing.
namespace DeepSeekCluster.Coordinator.Grains;

/// <summary>
/// Kept inside the job grain's persisted state, so a recovery that spans a Coordinator restart is still timed from its
/// cause. A second failure while one recovery is under way extends it rather than starting another.
/// </summary>
[GenerateSerializer]
public sealed class RecoveryClock
{
    /// <summary>The re-formation in progress; null when none is.</summary>
    [Id(0)] public Reformation? Current { get; set; }

    public string? Cause => Current?.Cause;

    /// <summary>A re-formation starts (a worker left, was lost or hung, a collective failed, or the job grows).</summary>
    public void Start(string cause, DateTimeOffset now)
    {
        if (Current is not null && Current.ResumedAt is null) return;
        Current = new Reformation { DetectedAt = now, Cause = cause };
    }

    /// <summary>Generation <paramref name="generation"/> formed; a formation nobody is timing (the first one) is not a recovery.</summary>
    public void Formed(long generation, DateTimeOffset now)
    {
        if (Current is null) return;
        Current.FormedAt = now;
        Current.Generation = generation;
    }

    /// <summary>Rank 0 of <paramref name="generation"/> resumed at <paramref name="step"/>.</summary>
    public void Resumed(long generation, long step, DateTimeOffset now)
    {
        if (Current is null || Current.Generation != generation) return;
        Current.ResumedAt = now;
        Current.ResumedStep = step;
    }

    /// <summary>
    /// A step of <paramref name="generation"/> completed. The first one after its resume ends the recovery: returns its
    /// timings and stops the clock; null otherwise.
    /// </summary>
    public Recovery? StepCompleted(long generation, long step, DateTimeOffset now)
    {
        if (Current is not { } r || r.Generation != generation || step <= r.ResumedStep) return null;
        Current = null;
        return new Recovery(r.Cause, (now - r.DetectedAt).TotalSeconds,
            Formation: r.FormedAt is { } f ? (f - r.DetectedAt).TotalSeconds : null,
            Restore: r.FormedAt is { } f2 && r.ResumedAt is { } a ? (a - f2).TotalSeconds : null,
            FirstStep: r.ResumedAt is { } a2 ? (now - a2).TotalSeconds : null,
            r.ResumedStep);
    }

    /// <summary>The job ended: a recovery under way is not timed.</summary>
    public void Stop() => Current = null;
}

/// <summary>A re-formation's timestamps (the persisted shape of <see cref="RecoveryClock"/>).</summary>
[GenerateSerializer]
public sealed class Reformation
{
    [Id(0)] public DateTimeOffset DetectedAt { get; set; }
    [Id(1)] public string Cause { get; set; } = "";
    [Id(2)] public DateTimeOffset? FormedAt { get; set; }
    [Id(3)] public DateTimeOffset? ResumedAt { get; set; }
    [Id(4)] public long Generation { get; set; }
    [Id(5)] public long ResumedStep { get; set; }
}

/// <summary>A finished recovery in seconds: cause → first step (Total), and its parts where they were seen.</summary>
public sealed record Recovery(string Cause, double Total, double? Formation, double? Restore, double? FirstStep, long ResumedStep);
