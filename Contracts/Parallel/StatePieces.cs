// The pieces a layout's live optimizer state falls into under parallel.redundancy, which rank holds each, and which of a
// rank's pieces its ring neighbour must copy; not the copy or the reshard themselves (the worker's LiveShards). Here, not
// in the worker, because the Coordinator asks the same question when it picks the members a job shrinks to (LiveMembers).
namespace DeepSeekCluster.Contracts.Parallel;

/// <summary>
/// Rows Split(n, <see cref="Parts"/>, <see cref="Index"/>) of the optimizer state of every replicated parameter
/// (<see cref="ExpertShard"/> -1), or of every routed expert parameter of expert shard <see cref="ExpertShard"/> (its moments,
/// and its weights: the master rows in bf16, the parameter rows otherwise).
/// </summary>
public readonly record struct StatePiece(int ExpertShard, int Index, int Parts)
{
    public bool Experts => ExpertShard >= 0;
    public override string ToString() => Experts ? $"expert shard {ExpertShard} part {Index} of {Parts}" : $"shard {Index}";
}

/// <summary>
/// The pieces of a dp-replica layout with <see cref="Ep"/> expert shards; <see cref="Sharded"/>: ZeRO shards the optimizer
/// (zero ≥ 1 on dp &gt; 1). The replicated parameters' state is split over all dp replicas (one piece each) or held whole by
/// every replica; an expert shard's over the dp/ep replicas that hold it (ParallelLayout.ZeroRowsOfRank) or whole by each
/// of them. A piece held by one replica alone is lost with it unless the replica before it in the ring keeps a copy.
/// </summary>
public sealed record StatePieces(int Dp, int Ep, bool Sharded)
{
    int ReplicatedParts => Sharded ? Dp : 1;
    int ExpertParts => Sharded ? Dp / Ep : 1;

    /// <summary>Every piece once, in the order a reshard sends them: the replicated parameters', then each expert shard's.</summary>
    public IEnumerable<StatePiece> All()
    {
        for (int d = 0; d < ReplicatedParts; d++) yield return new StatePiece(-1, d, ReplicatedParts);
        if (Ep < 2) yield break;
        for (int j = 0; j < Ep; j++)
            for (int h = 0; h < ExpertParts; h++) yield return new StatePiece(j, h, ExpertParts);
    }

    /// <summary>The pieces replica <paramref name="replica"/> holds: its ZeRO rows (or all) of the replicated state, and of its expert shard's.</summary>
    public StatePiece[] Of(int replica)
    {
        var replicated = new StatePiece(-1, Sharded ? replica : 0, ReplicatedParts);
        return Ep < 2 ? [replicated] : [replicated, new StatePiece(replica % Ep, Sharded ? replica / Ep : 0, ExpertParts)];
    }

    /// <summary>How many replicas hold <paramref name="piece"/>.</summary>
    public int Holders(StatePiece piece) => piece.Experts ? Dp / Ep / ExpertParts : Dp / ReplicatedParts;

    /// <summary>The pieces of <paramref name="replica"/> that no other replica holds: what its ring neighbour's copy keeps.</summary>
    public StatePiece[] Copied(int replica) => Dp < 2 ? [] : [.. Of(replica).Where(p => Holders(p) == 1)];

    /// <summary>
    /// The pieces replica <paramref name="replica"/> keeps between steps: its own, and with <paramref name="redundancy"/>
    /// its copy of the next replica's singly held ones (LiveShards.Refresh keeps the copy of replica (r + 1) mod dp).
    /// </summary>
    public IEnumerable<StatePiece> Kept(int replica, bool redundancy) => redundancy ? Of(replica).Concat(Copied((replica + 1) % Dp)) : Of(replica);
}
