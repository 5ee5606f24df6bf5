// Which workers a sharded job keeps when it re-forms onto fewer than it has: a set whose live state (each survivor's own
// pieces and, under parallel.redundancy, its copy of its neighbour's) holds every piece of the old layout, so the new
// generation reshards live instead of loading the committed checkpoint. The workers decide where to resume themselves
// (LiveShards.Cover, from what each one actually holds); this only keeps the Coordinator from leaving a needed one out.
namespace DeepSeekCluster.Contracts.Parallel;

public static class LiveMembers
{
    /// <summary>
    /// The members of a new generation of <paramref name="pp"/> stages of <paramref name="dp"/> replicas, as indices into
    /// <paramref name="candidates"/> in new rank order (stage-major): each stage's from the survivors of that stage of the
    /// old layout (<paramref name="candidates"/>[i]: its old stage and replica; null for a spare, which holds nothing and
    /// may fill any stage), chosen by <see cref="Covering"/> over the stage's <paramref name="pieces"/> (every stage's
    /// state has the same pieces) before any spare; null when some stage cannot be covered that way.
    /// </summary>
    public static int[]? ByStage(StatePieces pieces, int pp, IReadOnlyList<(int Stage, int Replica)?> candidates, int dp)
    {
        var members = new List<int>();
        var spares = Enumerable.Range(0, candidates.Count).Where(i => candidates[i] is null).ToList();
        for (int stage = 0; stage < pp; stage++)
        {
            var own = Enumerable.Range(0, candidates.Count).Where(i => candidates[i]?.Stage == stage).Concat(spares).ToList();
            if (Covering(pieces, redundancy: true, [.. own.Select(i => candidates[i]?.Replica)], dp) is not { } chosen) return null;
            var picked = chosen.Select(c => own[c]).ToList();
            members.AddRange(picked);
            spares.RemoveAll(picked.Contains);
        }
        return [.. members];
    }

    /// <summary>Search nodes before giving up: the pools are small, and giving up only costs the live resume.</summary>
    const int Budget = 100_000;

    /// <summary>
    /// The first <paramref name="count"/> candidates, in the order given (the order of preference), whose kept pieces of
    /// <paramref name="pieces"/> together hold every piece; null when no such set exists (or the search gave up).
    /// <paramref name="replicas"/>[i]: candidate i's replica in the old layout, null for one that holds nothing of it (a
    /// spare). The result lists candidate indices in ascending order.
    /// </summary>
    public static int[]? Covering(StatePieces pieces, bool redundancy, IReadOnlyList<int?> replicas, int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        int n = replicas.Count;
        if (count > n) return null;
        var all = pieces.All().ToList();
        var index = all.Select((p, i) => (p, i)).ToDictionary(x => x.p, x => x.i);
        var holds = replicas.Select((r, i) => r is not { } replica ? []
            : replica >= 0 && replica < pieces.Dp ? pieces.Kept(replica, redundancy).Select(p => index[p]).Distinct().ToArray()
            : throw new ArgumentOutOfRangeException(nameof(replicas), $"candidate {i}'s replica {replica} is not one of dp {pieces.Dp}")).ToArray();
        // later[i][k]: how many of candidates i.. hold piece k (an uncovered piece none of them holds ends the branch).
        var later = new int[n + 1][];
        later[n] = new int[all.Count];
        for (int i = n - 1; i >= 0; i--)
        {
            later[i] = (int[])later[i + 1].Clone();
            foreach (int k in holds[i]) later[i][k]++;
        }
        var covered = new int[all.Count];
        int missing = all.Count, nodes = 0;
        var chosen = new List<int>();

        // Including a candidate before skipping it finds the set that keeps the earliest candidates.
        bool Search(int i)
        {
            if (++nodes > Budget) return false;
            if (missing == 0)
            {
                // Every piece is held: the earliest candidates not taken fill the remaining places.
                if (n - i < count - chosen.Count) return false;
                for (int j = i; chosen.Count < count && j < n; j++) chosen.Add(j);
                return true;
            }
            if (i == n || chosen.Count == count) return false;
            for (int k = 0; k < all.Count; k++)
                if (covered[k] == 0 && later[i][k] == 0) return false;
            chosen.Add(i);
            foreach (int k in holds[i]) if (covered[k]++ == 0) missing--;
            if (Search(i + 1)) return true;
            chosen.RemoveAt(chosen.Count - 1);
            foreach (int k in holds[i]) if (--covered[k] == 0) missing++;
            return n - i - 1 >= count - chosen.Count && Search(i + 1);
        }

        return Search(0) ? [.. chosen] : null;
    }
}
