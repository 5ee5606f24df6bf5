// What the step guard on a job's workers did (cluster_control.proto GuardAction): a skipped step or a rollback.
namespace DeepSeekCluster.Contracts.Grains;

[GenerateSerializer, Immutable]
public sealed record GuardReport
{
    [Id(0)] public long Step { get; init; }
    /// <summary>"skipped" or "rolled_back".</summary>
    [Id(1)] public string Action { get; init; } = "";
    [Id(2)] public string Reason { get; init; } = "";
    [Id(3)] public long RestoredStep { get; init; }
    [Id(4)] public long SamplesSkipped { get; init; }
    [Id(5)] public double LrScale { get; init; } = 1;
    [Id(6)] public int Rollbacks { get; init; }
}
