// Who gets free workers (docs/agent.md, "Sharing the cluster"): the registry's rule as functions of its state, so the
// registry only records and carries out what this decides.
//
// The queue: jobs waiting to form, by priority (higher first), then by how long they have waited (older first). A claim
// gets the free workers left after every job ahead of it in the queue has what it still needs to form, and never more
// than its tenant's quota leaves. No job passes the head of its priority's queue (no backfilling: a stream of small jobs
// cannot starve a large one), except that a job ahead reserves nothing when it cannot form on the cluster as it is (its
// quota leaves too few, or it needs more workers than are online): it must not stop the ones behind it.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class ShareRecord
{
    /// <summary>Null for a job registered before shares existed: it counts as <see cref="Default"/>.</summary>
    [Id(0)] public JobShare? Share { get; set; }
    /// <summary>Registration order: among preemption victims of one priority the youngest goes first.</summary>
    [Id(1)] public long Order { get; set; }
    /// <summary>When the job last began to wait to form (the registry's sequence); 0 while it does not.</summary>
    [Id(2)] public long WaitingSince { get; set; }

    public static readonly JobShare Default = new(0, JobSpec.DefaultTenant, 1);
}

public sealed class SharePolicy(ClusterRegistryGrainState s, IReadOnlyDictionary<string, int> quotas)
{
    public JobShare ShareOf(string jobId) => s.Shares.TryGetValue(jobId, out var r) && r.Share is { } share ? share : ShareRecord.Default;

    public int Held(string jobId) => s.Workers.Values.Count(w => w.JobId == jobId);

    public List<KeyValuePair<string, RegisteredWorker>> Free() =>
        [.. s.Workers.Where(kv => kv.Value.Online && kv.Value.JobId is null && kv.Value.Capabilities is not null).OrderBy(kv => kv.Value.Since)];

    /// <summary>Workers the tenant may still take; null without a quota.</summary>
    public int? QuotaLeft(string tenant) => quotas.TryGetValue(tenant, out int q)
        ? Math.Max(0, q - s.Workers.Values.Count(w => w.JobId is { } j && ShareOf(j).Tenant == tenant))
        : null;

    /// <summary>Workers the job still lacks to form.</summary>
    public int Shortfall(string jobId) => Math.Max(0, ShareOf(jobId).Need - Held(jobId));

    long WaitingSince(string jobId) =>
        s.Waiting.GetValueOrDefault(jobId) == JobWait.ToForm && s.Shares.TryGetValue(jobId, out var r) && r.WaitingSince > 0 ? r.WaitingSince : long.MaxValue;

    /// <summary>The jobs served before this one: waiting to form, of a higher priority, or of the same and waiting longer.</summary>
    public List<string> Ahead(string jobId)
    {
        var me = ShareOf(jobId);
        long since = WaitingSince(jobId);
        return [.. s.Waiting.Where(kv => kv.Value == JobWait.ToForm && kv.Key != jobId).Select(kv => kv.Key)
            .Where(j => ShareOf(j).Priority > me.Priority || ShareOf(j).Priority == me.Priority && WaitingSince(j) < since)];
    }

    /// <summary>Whether the job could form: within its quota, from free workers and those held by lower priorities.</summary>
    public bool CanForm(string jobId)
    {
        var me = ShareOf(jobId);
        int lacks = Shortfall(jobId);
        if (QuotaLeft(me.Tenant) is { } left && left < lacks) return false;
        int reachable = Free().Count + s.Workers.Values.Count(w => w.Online && w.JobId is { } o && o != jobId && s.Shares.ContainsKey(o) && ShareOf(o).Priority < me.Priority);
        return reachable >= lacks;
    }

    /// <summary>Whether the job could form on the online workers (once their jobs let them go) within its quota.</summary>
    public bool CouldEverForm(string jobId)
    {
        var me = ShareOf(jobId);
        if (QuotaLeft(me.Tenant) is { } left && left < Shortfall(jobId)) return false;
        return me.Need <= s.Workers.Values.Count(w => w.Online && w.Capabilities is not null);
    }

    /// <summary>Free workers kept for the jobs ahead of this one.</summary>
    public int Reserved(string jobId) => Ahead(jobId).Where(CouldEverForm).Sum(Shortfall);

    /// <summary>How many of <paramref name="max"/> wanted workers the job gets now, and why not more (null: nothing held back).</summary>
    public (int Count, string? Kind, string? Why) Allowed(string jobId, int max)
    {
        int free = Free().Count, want = Math.Min(Math.Max(0, max), free);
        // A holder that is not a registered job (a short hold of a worker for other work, or a job from before shares
        // existed) takes free workers as it always did, first come, first served.
        if (!s.Shares.ContainsKey(jobId)) return (want, null, null);
        var me = ShareOf(jobId);
        int? quota = QuotaLeft(me.Tenant);
        int reserved = Reserved(jobId);
        int count = Math.Max(0, Math.Min(Math.Min(want, quota ?? int.MaxValue), free - reserved));
        if (count == want) return (count, null, null);
        if (quota is { } q && q < want && q <= free - reserved)
            return (count, "quota", $"tenant '{me.Tenant}' is at its quota of {quotas[me.Tenant]} workers: {count} of {want} free workers given");
        var ahead = Ahead(jobId).Where(CouldEverForm).Select(j => $"{j} (priority {ShareOf(j).Priority}, needs {Shortfall(j)})");
        return (count, "held", $"{reserved} of {free} free workers kept for jobs ahead in the queue: {string.Join(", ", ahead)}; {count} of {want} given");
    }

    /// <summary>
    /// The running jobs whose workers a job waiting to form takes: the lowest priority first, the youngest first within one,
    /// until the job could form. Empty: it needs none; null: even all of them would not let it form.
    /// </summary>
    public List<(string JobId, int Workers)>? Victims(string jobId)
    {
        var me = ShareOf(jobId);
        int lacks = Shortfall(jobId) - Math.Max(0, Free().Count - Reserved(jobId));
        if (lacks <= 0) return [];
        var victims = new List<(string, int)>();
        foreach (var g in s.Workers.Values.Where(w => w.Online && w.JobId is { } o && o != jobId && s.Shares.ContainsKey(o) && ShareOf(o).Priority < me.Priority)
                     .GroupBy(w => w.JobId!)
                     .OrderBy(g => ShareOf(g.Key).Priority).ThenByDescending(g => s.Shares.GetValueOrDefault(g.Key)?.Order ?? 0))
        {
            if (lacks <= 0) break;
            victims.Add((g.Key, g.Count()));
            lacks -= g.Count();
        }
        return lacks <= 0 ? victims : null;
    }
}
