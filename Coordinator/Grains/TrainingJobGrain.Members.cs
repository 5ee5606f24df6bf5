// Which survivors a sharded job keeps when it re-forms onto fewer workers than it has. Each rank of a ZeRO or expert-
// parallel job holds pieces of the state no other rank holds, and under parallel.redundancy its ring neighbour keeps a
// copy of them; the first survivors by rank may leave out the one that holds a piece (or its copy), and the job would
// load the committed checkpoint although the survivors together hold every piece live.
using DeepSeekCluster.Contracts.Parallel;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    /// <summary>
    /// <paramref name="world"/> of <paramref name="ordered"/> (the pool, the last generation's members first by rank) whose
    /// live state holds every piece of the last generation's layout (StatePieces), the first by rank where several do;
    /// null where the first by rank already do, where none do, or where the job keeps no live shards to reshard
    /// (no redundancy, zero 0 without ep, or pp &gt; 1: the workers' Resumption reshards only a single-stage ring).
    /// </summary>
    List<Contracts.Grains.WorkerCapabilities>? KeepingLiveState(List<Contracts.Grains.WorkerCapabilities> ordered, int world)
    {
        var plan = S.Spec!.Parallel;
        int dp = S.GenerationDp;
        if (!plan.Redundancy || plan.Pp > 1 || plan.Zero == 0 && plan.Ep <= 1 || dp < 2 || S.Generation == 0) return null;
        if (ordered.Count(p => S.Workers.Any(w => w.WorkerId == p.WorkerId)) <= world) return null; // every survivor stays
        var pieces = new StatePieces(dp, Math.Max(1, plan.Ep), plan.Zero > 0);
        var replicas = ordered.Select(p => S.Workers.Find(w => w.WorkerId == p.WorkerId) is { } w && w.Rank < dp ? w.Rank : (int?)null).ToList();
        var first = Enumerable.Range(0, world).ToArray();
        if (LiveMembers.Covering(pieces, redundancy: true, replicas, world) is not { } chosen || chosen.SequenceEqual(first)) return null;
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
