// The exactly-once ledger of a job: which epoch-permutation positions the steps behind its current state consumed.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

/// <summary>
/// Every rank reports its slice of every step. Steps 1..<see cref="Prefix"/> are known to be exactly
/// [(s−1)·GB, s·GB) each and are kept as one number; later steps keep their reported slices until they are complete.
/// A resume at step R drops every step after R (those steps are redone), so the ledger always describes the lineage of
/// the state that training continues from. Reports that hit a step already complete are kept as duplicates, so an
/// overlap stays visible instead of being absorbed.
/// </summary>
[GenerateSerializer]
public sealed class SampleLedger
{
    /// <summary>Steps 1..Prefix each consumed exactly their global batch.</summary>
    [Id(0)] public long Prefix { get; set; }
    /// <summary>Slices of steps after Prefix: step → [start, count] pairs as reported.</summary>
    [Id(1)] public SortedDictionary<long, List<long[]>> Open { get; set; } = [];
    /// <summary>Reports for steps already complete: [step, start, count].</summary>
    [Id(2)] public List<long[]> Duplicates { get; set; } = [];
    /// <summary>Samples filled in by <see cref="ResumedAt"/> rather than reported (see there).</summary>
    [Id(3)] public long Inferred { get; set; }

    public void Add(long step, long start, long count, int globalBatch)
    {
        if (step < 1 || count <= 0) return;
        if (step <= Prefix) { Duplicates.Add([step, start, count]); return; }
        if (!Open.TryGetValue(step, out var slices)) Open[step] = slices = [];
        slices.Add([start, count]);
        Fold(globalBatch);
    }

    /// <summary>
    /// A slice reported by the previous generation after the re-formation: kept unless its step is already complete or the
    /// slice overlaps what is known of it (then it only confirms what the lineage holds). Returns whether it was kept.
    /// </summary>
    public bool AddLate(long step, long start, long count, int globalBatch)
    {
        if (step < 1 || count <= 0 || step <= Prefix) return false;
        if (Open.TryGetValue(step, out var slices) && slices.Any(s => s[0] < start + count && start < s[0] + s[1])) return false;
        Add(step, start, count, globalBatch);
        return true;
    }

    /// <summary>Folds complete steps into the prefix while they follow it without a gap.</summary>
    void Fold(int globalBatch)
    {
        while (Open.TryGetValue(Prefix + 1, out var next) && IsExactly(next, Prefix * globalBatch, globalBatch))
        {
            Open.Remove(Prefix + 1);
            Prefix++;
        }
    }

    /// <summary>
    /// A generation resumed from a state at <paramref name="step"/>: later steps are forgotten, and a step up to it that
    /// some rank reported only in part is completed. That is not a guess: a state at step s exists only if step s's
    /// optimizer update averaged the gradients of every replica's slice, so the whole global batch was consumed; the
    /// missing report belonged to a rank killed between its all-reduce and its report. Filled samples are counted in
    /// <see cref="Inferred"/>. A step nobody reported stays a gap.
    /// </summary>
    public void ResumedAt(long step, int globalBatch)
    {
        DropAfter(step, globalBatch);
        foreach (var (s, slices) in Open.Where(kv => kv.Key <= step).ToList())
        {
            long start = (s - 1) * globalBatch, end = s * globalBatch, at = start;
            foreach (var (a, b) in Merge(slices.Select(x => (x[0], x[0] + x[1]))))
            {
                if (a > at) { slices.Add([at, a - at]); Inferred += a - at; }
                at = Math.Max(at, b);
            }
            if (at < end) { slices.Add([at, end - at]); Inferred += end - at; }
        }
        Fold(globalBatch);
    }

    /// <summary>The state now descends from step <paramref name="step"/>: later steps are forgotten.</summary>
    public void DropAfter(long step, int globalBatch)
    {
        if (step < Prefix) Prefix = Math.Max(0, step);
        foreach (var later in Open.Keys.Where(s => s > step).ToList()) Open.Remove(later);
        Duplicates.RemoveAll(d => d[0] > step);
    }

    public Consumption Summary(int globalBatch)
    {
        var ranges = new List<(long Start, long End)>();
        if (Prefix > 0) ranges.Add((0, Prefix * globalBatch));
        foreach (var slice in Open.Values.SelectMany(s => s).Concat(Duplicates.Select(d => new[] { d[1], d[2] })))
            ranges.Add((slice[0], slice[0] + slice[1]));
        long reported = ranges.Sum(r => r.End - r.Start);
        var merged = Merge(ranges);
        long unique = merged.Sum(r => r.End - r.Start);
        long lastStep = Math.Max(Prefix, Open.Count > 0 ? Open.Keys.Max() : 0);
        bool complete = reported == unique && (lastStep == 0 ? merged.Count == 0 : merged.Count == 1 && merged[0] == (0, lastStep * globalBatch));
        return new Consumption
        {
            Samples = unique, Ranges = [.. merged.Select(r => new[] { r.Start, r.End })], Complete = complete, Overlaps = reported - unique,
            Inferred = Inferred,
        };
    }

    static bool IsExactly(List<long[]> slices, long start, long count)
    {
        var merged = Merge(slices.Select(s => (s[0], s[0] + s[1])));
        return merged.Count == 1 && merged[0] == (start, start + count) && slices.Sum(s => s[1]) == count;
    }

    static List<(long Start, long End)> Merge(IEnumerable<(long Start, long End)> ranges)
    {
        var merged = new List<(long Start, long End)>();
        foreach (var r in ranges.OrderBy(r => r.Start))
        {
            if (merged.Count > 0 && r.Start <= merged[^1].End) merged[^1] = (merged[^1].Start, Math.Max(merged[^1].End, r.End));
            else merged.Add(r);
        }
        return merged;
    }
}
