// What a study persists: its spec, every trial (values, state, curve: the sampler's whole history), the ASHA rung table
// and its events. Written after every change, and a trial before its job exists, so a restart loses none of it.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

[GenerateSerializer]
public sealed class StudyGrainState
{
    [Id(0)] public string? SpecJson { get; set; }
    [Id(1)] public StudyState State { get; set; }
    [Id(2)] public DateTimeOffset? CreatedAt { get; set; }
    [Id(3)] public List<TrialRecord> Trials { get; set; } = [];
    /// <summary>Null unless the scheduler is asha.</summary>
    [Id(4)] public AshaRungs? Rungs { get; set; }
    [Id(5)] public List<string> Events { get; set; } = [];
    /// <summary>The grid sampler had no point left.</summary>
    [Id(6)] public bool SamplerExhausted { get; set; }
    /// <summary>pbt: each trial's latest result at a perturbation boundary, lower is better (the sign of StudyHistory.Lower).</summary>
    [Id(7)] public Dictionary<int, double> PbtScores { get; set; } = [];
    /// <summary>When the trials were last followed: worker time is counted from there.</summary>
    [Id(8)] public DateTimeOffset? LastFollowed { get; set; }
}

[GenerateSerializer]
public sealed class TrialRecord
{
    [Id(0)] public int Index { get; set; }
    [Id(1)] public string JobId { get; set; } = "";
    /// <summary>One per dimension of the space: the value, or a categorical dimension's index.</summary>
    [Id(2)] public double[] Values { get; set; } = [];
    [Id(3)] public TrialState State { get; set; }
    [Id(4)] public long Step { get; set; }
    /// <summary>The metric at each step the trial's job reported it, as reported (not sign-adjusted).</summary>
    [Id(5)] public List<ValidationPoint> Curve { get; set; } = [];
    /// <summary>The next rung this trial has not reached.</summary>
    [Id(6)] public int NextRung { get; set; }
    [Id(7)] public int? StoppedAtRung { get; set; }
    [Id(8)] public long? CheckpointStep { get; set; }
    [Id(9)] public string? Error { get; set; }
    /// <summary>Whether the trial's job was submitted (false only between persisting the trial and submitting it).</summary>
    [Id(10)] public bool Submitted { get; set; }
    /// <summary>pbt: the next perturbation boundary (step) the trial has not reached.</summary>
    [Id(11)] public long NextBoundary { get; set; }
    /// <summary>pbt: each exploit, oldest first; the last one's checkpoint is what the trial's current job starts from.</summary>
    [Id(12)] public List<PbtExploit> Exploits { get; set; } = [];
    /// <summary>Seconds × workers the trial's jobs held, summed at each follow.</summary>
    [Id(13)] public double WorkerSeconds { get; set; }
}

/// <summary>At <see cref="Boundary"/> the trial left <see cref="OldJob"/> and went on from trial <see cref="FromTrial"/>'s checkpoint.</summary>
[GenerateSerializer]
public sealed class PbtExploit
{
    [Id(0)] public long Boundary { get; set; }
    [Id(1)] public int FromTrial { get; set; }
    [Id(2)] public string FromJob { get; set; } = "";
    [Id(3)] public long Step { get; set; }
    [Id(4)] public string OldJob { get; set; } = "";
    [Id(5)] public double[] OldValues { get; set; } = [];
    [Id(6)] public double[] NewValues { get; set; } = [];
}
