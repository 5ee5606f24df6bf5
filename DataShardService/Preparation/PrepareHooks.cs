// Observation points inside a prepare run; tests use them to interrupt a run at a chosen place.
namespace DeepSeekCluster.DataShardService.Preparation;

public sealed class PrepareHooks
{
    /// <summary>Called after each shard is stored (before the manifest exists); an exception aborts the run.</summary>
    public Action<ShardEntry>? ShardStored { get; set; }
}
