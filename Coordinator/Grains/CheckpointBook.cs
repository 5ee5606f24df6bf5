// A job's checkpoints as the Coordinator knows them: rank files reported per step, the steps the store committed, the
// commits on their way, and which committed steps retention may delete. Not the store: it never talks to one.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

/// <summary>
/// Kept inside the job grain's persisted state (as <see cref="SampleLedger"/> is). A step's record is complete once
/// every rank of its generation reported its file; the complete record, rank 0's manifest included, is handed to the
/// committer once and kept here without manifests (they can be megabytes for a large model).
/// </summary>
[GenerateSerializer]
public sealed class CheckpointBook
{
    /// <summary>Reported steps, per (step, generation), in the order they were first reported.</summary>
    [Id(0)] public List<CheckpointRecord> Reported { get; set; } = [];
    /// <summary>Steps the CheckpointStore committed, oldest first; those retention deleted carry DeletedAt.</summary>
    [Id(1)] public List<CommittedCheckpoint> Committed { get; set; } = [];
    /// <summary>Complete steps handed to the committer whose outcome has not come back.</summary>
    [Id(2)] public List<long> Committing { get; set; } = [];

    /// <summary>The newest committed step still in the store (0: none, the job starts from scratch).</summary>
    public long NewestCommitted => Committed.Where(c => c.DeletedAt is null).Select(c => c.Step).DefaultIfEmpty(0).Max();

    /// <summary>
    /// One rank's file of <paramref name="generation"/>'s checkpoint at the report's step, in a generation of
    /// <paramref name="world"/> ranks. Returns the complete record (with rank 0's manifest) when this report completes
    /// it, once; null otherwise.
    /// </summary>
    public CheckpointRecord? Report(long generation, int world, CheckpointReport report)
    {
        int i = Reported.FindIndex(c => c.Step == report.Step && c.Generation == generation);
        var record = i >= 0 ? Reported[i] : new CheckpointRecord { Step = report.Step, Generation = generation, World = world };
        // A report sent again after the step was handed over changes nothing until that commit is decided; after a commit
        // that failed, a rank's new save hands the step over again.
        if (record.Complete && (Committing.Contains(record.Step) || Committed.Any(c => c.Step == record.Step))) return null;
        var files = record.Files.Where(f => f.Rank != report.Rank).Append(report).OrderBy(f => f.Rank).ToArray();
        record = record with { Files = files, Complete = files.Length == record.World };
        var kept = record.Complete ? WithoutManifests(record) : record;
        if (i >= 0) Reported[i] = kept; else Reported.Add(kept);
        if (!record.Complete) return null;
        if (!Committing.Contains(record.Step)) Committing.Add(record.Step);
        return record;
    }

    /// <summary>Records a commit; false when it was recorded already (a retried commit).</summary>
    public bool Commit(CommittedCheckpoint checkpoint)
    {
        Committing.Remove(checkpoint.Step);
        if (Committed.Any(c => c.Step == checkpoint.Step)) return false;
        Committed.Add(checkpoint);
        Committed.Sort((a, b) => a.Step.CompareTo(b.Step));
        return true;
    }

    public void NotCommitted(long step) => Committing.Remove(step);

    /// <summary>
    /// The rule of retention: the committed steps that may be deleted, given <paramref name="keepLast"/> (0 keeps all)
    /// and the step a generation is resuming from (null when none is: it may load that step any moment). Never the
    /// newest committed step. None while a commit of a step older than the newest is on its way: the store treats an
    /// uncommitted step older than its newest commit as a leftover, so retention waits until that commit is decided.
    /// </summary>
    public IReadOnlyList<long> Deletable(int keepLast, long? resuming)
    {
        var existing = Committed.Where(c => c.DeletedAt is null).Select(c => c.Step).ToList();
        if (keepLast <= 0 || existing.Count <= keepLast) return [];
        long newest = existing[^1];
        if (Committing.Any(s => s < newest)) return [];
        return [.. existing.SkipLast(keepLast).Where(s => s != resuming)];
    }

    /// <summary>What the store must keep when <paramref name="deletable"/> go: every other committed step and the commits on their way.</summary>
    public long[] KeptBesides(IReadOnlyList<long> deletable) =>
        [.. Committed.Where(c => c.DeletedAt is null && !deletable.Contains(c.Step)).Select(c => c.Step).Concat(Committing).Distinct().Order()];

    /// <summary>The store deleted these committed steps; they stay listed, marked deleted.</summary>
    public void Deleted(IEnumerable<long> steps, DateTimeOffset at)
    {
        var gone = steps.ToHashSet();
        for (int i = 0; i < Committed.Count; i++)
            if (gone.Contains(Committed[i].Step) && Committed[i].DeletedAt is null) Committed[i] = Committed[i] with { DeletedAt = at };
    }

    /// <summary>The records without manifests, as the job status shows them.</summary>
    public CheckpointRecord[] Shown() => [.. Reported.Select(WithoutManifests)];

    static CheckpointRecord WithoutManifests(CheckpointRecord r) =>
        r.Files.Any(f => f.ManifestJson.Length > 0) ? r with { Files = [.. r.Files.Select(f => f with { ManifestJson = "" })] } : r;
}
