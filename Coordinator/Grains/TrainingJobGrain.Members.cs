// Which survivors a sharded job keeps when it re-forms onto fewer workers than it has. Each rank of a ZeRO or expert-
// parallel job holds pieces of the state no other rank holds, and under parallel.redundancy its ring neighbour keeps a
// copy of them; the first survivors by rank may leave out the one that holds a piece (or its copy), and the job would
// load the committed checkpoint although the survivors together hold every piece live. In a pipeline each stage's
// replicas hold that stage's pieces, so each new stage is drawn from its own old stage's survivors.
using DeepSeekCluster.Contracts.Parallel;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    /// <summary>
    /// <paramref name="world"/> of <paramref name="ordered"/> (the pool, the last generation's members first by rank), in
    /// new rank order, whose live state holds every piece of the last generation's layout (StatePieces): each new stage's
    /// members from the survivors of that stage, then spares (a survivor numbered into another stage drops its state),
    /// the first by rank where several sets do. Null where the first by rank already are such members, where no set is,
    /// or where the job keeps no live shards to reshard (no redundancy, or zero 0 without ep).
    /// </summary>
    List<Contracts.Grains.WorkerCapabilities>? KeepingLiveState(List<Contracts.Grains.WorkerCapabilities> ordered, int world)
    {
        var plan = S.Spec!.Parallel;
        int oldDp = S.GenerationDp, pp = Math.Max(1, plan.Pp);
        if (!plan.Redundancy || plan.Zero == 0 && plan.Ep <= 1 || oldDp < 2 || S.Generation == 0) return null;
        var pieces = new StatePieces(oldDp, Math.Max(1, plan.Ep), plan.Zero > 0);
        // Old ranks are stage-major too: rank = stage·dp + replica.
        var old = ordered.Select(p => S.Workers.Find(w => w.WorkerId == p.WorkerId) is { } w && w.Rank < oldDp * pp ? (w.Rank / oldDp, w.Rank % oldDp) : ((int, int)?)null).ToList();
        if (LiveMembers.ByStage(pieces, pp, old, world / pp) is not { } chosen || chosen.SequenceEqual(Enumerable.Range(0, world))) return null;
        return [.. chosen.Select(i => ordered[i])];
    }

    /// <summary>
    /// What a generation that resumed from "shards" resumed from, in the job's terms: under ZeRO each piece (a ZeRO shard,
    /// and under ep each holder's part of an expert shard) is held by one rank, so from it or its neighbour's copy; at
    /// zero 0 under ep an expert shard is held by every replica of it, and copied only where it has one holder (dp = ep).
    /// </summary>
    static string LiveShardsResumed(Contracts.Grains.ParallelPlan plan) => (plan.Zero, plan.Ep) switch
    {
        ( > 0, <= 1) => "the live ZeRO shards of the survivors (each held by its rank or its neighbour's copy)",
        ( > 0, _) => "the live ZeRO and expert shards of the survivors (each piece held by its rank or its neighbour's copy)",
        _ => "the live expert shards of the survivors (each from a survivor holding it, or from its neighbour's copy where only one rank held it)",
    };
}
