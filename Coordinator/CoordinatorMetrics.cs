// Meter "DeepSeekCluster.Coordinator": refusals (auth and stale generations), formations, rescales, checkpoint commits, worker
// joins and departures, and gauges of the cluster's shape (workers and jobs by state, job generations, heartbeat ages). Tags
// never carry secrets.
using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator;

/// <summary>
/// Counters are added where things happen. Gauges read a snapshot that the grains of this silo keep up to date: the
/// registry grain (one activation in the cluster) sets the worker counts, each job and worker grain its own entry. A
/// silo reports only what its own activations set, so sums over silos are the cluster's numbers.
/// </summary>
public sealed class CoordinatorMetrics
{
    public const string MeterName = "DeepSeekCluster.Coordinator";

    /// <summary>The states of <c>deepseek.cluster.workers</c>.</summary>
    public static readonly string[] WorkerStates = ["free", "assigned", "offline"];

    /// <summary>The events of <c>deepseek.cluster.worker_events</c>.</summary>
    public static readonly string[] WorkerEvents = ["joined", "left", "failed"];

    private readonly Counter<long> _authRefusals;
    private readonly Counter<long> _staleRefusals;
    private readonly Counter<long> _formations;
    private readonly Counter<long> _rescales;
    private readonly Counter<long> _commits;
    private readonly Counter<long> _jobEvents;
    private readonly Histogram<double> _recovery;
    private readonly Counter<long> _stepsRedone;
    private readonly Counter<long> _workerEvents;
    private readonly Counter<long> _studyDecisions;
    private readonly ConcurrentDictionary<string, IReadOnlyDictionary<TrialState, int>> _studyTrials = new(StringComparer.Ordinal);

    private readonly ConcurrentDictionary<string, long> _workersByState = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, long> _generations = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, (JobState State, int MaxWorkers)> _jobStates = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, DateTimeOffset> _heartbeats = new(StringComparer.Ordinal);
    private readonly TimeProvider _clock;

    public CoordinatorMetrics(IMeterFactory meterFactory, TimeProvider clock)
    {
        _clock = clock;
        var meter = meterFactory.Create(MeterName);
        _authRefusals = meter.CreateCounter<long>("deepseek_coordinator_auth_refusals", description: "Requests refused for a missing or wrong cluster token, and TLS handshakes refused for a missing or untrusted client certificate");
        _staleRefusals = meter.CreateCounter<long>("deepseek_coordinator_stale_generation_refusals", description: "Reports refused because they came from an older generation");
        // Zero series for every kind of report that can be fenced, so "no refusals" is a 0 on the dashboard, not a gap
        // (the Prometheus convention of initializing known label values).
        foreach (var what in new[] { "heartbeat", "step", "checkpoint", "resumed", "failure" })
            _staleRefusals.Add(0, new KeyValuePair<string, object?>("what", what));
        _formations = meter.CreateCounter<long>("deepseek_coordinator_formations", description: "Worker-set formations (each bumps a job's generation)");
        _rescales = meter.CreateCounter<long>("deepseek.cluster.rescales", "{rescale}", "Running jobs that began re-forming (reason: worker_left, grow or collective_failed)");
        _commits = meter.CreateCounter<long>("deepseek.cluster.checkpoint_commits", "{checkpoint}",
            "Checkpoint steps every rank reported, by outcome: committed, refused (by the store), failed (store unreachable), unconfigured");
        _jobEvents = meter.CreateCounter<long>("deepseek.cluster.job_events", "{event}", "Job transitions by event kind (submitted, formed, worker_lost, resumed, recovered, ...)");
        _recovery = meter.CreateHistogram<double>("deepseek.cluster.recovery", "s",
            "From the cause of a re-formation (a worker left, was lost or hung, or the job grew) to the first completed step of the new generation");
        _stepsRedone = meter.CreateCounter<long>("deepseek.cluster.steps_redone", "{step}", "Steps trained again because a re-formed generation resumed behind the job's highest step");
        _workerEvents = meter.CreateCounter<long>("deepseek.cluster.worker_events", "{event}",
            "Workers that joined (came online), left (cleanly) or failed (stream lost or heartbeat timeout)");
        // Zero series, so the first join or failure is an increase on the dashboard rather than a series appearing at 1.
        foreach (var e in WorkerEvents) _workerEvents.Add(0, new KeyValuePair<string, object?>("event", e));
        meter.CreateObservableGauge("deepseek.cluster.jobs", ObserveJobs, "{job}", "Jobs whose grain is active on this silo, by state");
        meter.CreateObservableGauge("deepseek.cluster.workers_wanted", ObserveWorkersWanted, "{worker}",
            "Workers the jobs active on this silo can use: maxWorkers of every forming, running or rescaling job (what an autoscaler scales the workers to)");
        meter.CreateObservableGauge("deepseek.cluster.workers", ObserveWorkers, "{worker}", "Known workers by state: free, assigned (to a job), offline");
        meter.CreateObservableGauge("deepseek.cluster.job_generation", ObserveGenerations, "{generation}", "The current generation of each job that is not finished");
        meter.CreateObservableGauge("deepseek.cluster.heartbeat_age", ObserveHeartbeats, "s", "Seconds since each online worker's last heartbeat");
        meter.CreateObservableGauge("deepseek.cluster.study_trials", ObserveStudyTrials, "{trial}", "Trials of each study by state");
        _studyDecisions = meter.CreateCounter<long>("deepseek.cluster.study_decisions", "{decision}", "Study scheduler decisions: ASHA continued or stopped at a rung, PBT exploited");
        foreach (var d in new[] { "continued", "stopped" }) _studyDecisions.Add(0, new KeyValuePair<string, object?>("decision", d));
    }

    /// <param name="surface">rest or grpc.</param>
    /// <param name="reason">missing or wrong.</param>
    public void AuthRefused(string surface, string reason) =>
        _authRefusals.Add(1, new KeyValuePair<string, object?>("surface", surface), new KeyValuePair<string, object?>("reason", reason));

    public void StaleRefused(string what) => _staleRefusals.Add(1, new KeyValuePair<string, object?>("what", what));

    public void Formed(bool rescale) => _formations.Add(1, new KeyValuePair<string, object?>("kind", rescale ? "rescale" : "initial"));

    /// <param name="reason">worker_left, grow or collective_failed.</param>
    public void Rescaled(string reason) => _rescales.Add(1, new KeyValuePair<string, object?>("reason", reason));

    /// <param name="outcome">committed, refused, failed or unconfigured.</param>
    public void CheckpointCommit(string outcome) => _commits.Add(1, new KeyValuePair<string, object?>("outcome", outcome));

    /// <param name="kind">One of JobEventKinds.All.</param>
    public void JobEvent(string kind) => _jobEvents.Add(1, new KeyValuePair<string, object?>("event", kind));

    /// <param name="cause">What started the re-formation: worker_left, worker_lost, worker_hung, grow or collective_failed.</param>
    public void Recovery(double seconds, string cause) => _recovery.Record(seconds, new KeyValuePair<string, object?>("event", cause));

    /// <summary>Recorded on every resume, 0 included: a resume that redid nothing is the measurement the goal is about.</summary>
    public void StepsRedone(long steps) => _stepsRedone.Add(Math.Max(0, steps));

    /// <summary>A worker came online (joined) or went offline: cleanly (<see cref="LeaveKind.Left"/>) or not (failed).</summary>
    public void WorkerJoined() => _workerEvents.Add(1, new KeyValuePair<string, object?>("event", "joined"));

    public void WorkerLeft(LeaveKind kind) => _workerEvents.Add(1, new KeyValuePair<string, object?>("event", kind == LeaveKind.Left ? "left" : "failed"));

    /// <param name="decision">continued or stopped (ASHA), exploited (PBT).</param>
    public void StudyDecision(string decision) => _studyDecisions.Add(1, new KeyValuePair<string, object?>("decision", decision));

    // ---- Snapshot for the gauges ----

    /// <summary>A study's trials by state (its grain calls this as it follows them).</summary>
    public void StudyTrials(string studyId, IReadOnlyDictionary<TrialState, int> byState) => _studyTrials[studyId] = byState;

    IEnumerable<Measurement<long>> ObserveStudyTrials() =>
        _studyTrials.SelectMany(kv => Enum.GetValues<TrialState>().Select(s => new Measurement<long>(kv.Value.GetValueOrDefault(s),
            new KeyValuePair<string, object?>("study", kv.Key), new KeyValuePair<string, object?>("state", s.ToString().ToLowerInvariant()))));

    /// <summary>The job's current state and its spec's maxWorkers (its grain calls this on activation and on every transition).</summary>
    public void JobStateChanged(string jobId, JobState state, int maxWorkers) => _jobStates[jobId] = (state, maxWorkers);

    /// <summary>The job's grain left this silo: the silo that activates it next reports it.</summary>
    public void JobDeactivated(string jobId) => _jobStates.TryRemove(jobId, out _);

    /// <summary>The registry's counts by state (see <see cref="WorkerStates"/>); null when the registry leaves this silo.</summary>
    public void Workers(IReadOnlyDictionary<string, long>? byState)
    {
        foreach (var state in WorkerStates)
        {
            if (byState is null) _workersByState.TryRemove(state, out _);
            else _workersByState[state] = byState.GetValueOrDefault(state);
        }
    }

    public void JobGeneration(string jobId, long generation) => _generations[jobId] = generation;

    public void JobFinished(string jobId) => _generations.TryRemove(jobId, out _);

    public void Heartbeat(string workerId, DateTimeOffset at) => _heartbeats[workerId] = at;

    public void WorkerGone(string workerId) => _heartbeats.TryRemove(workerId, out _);

    IEnumerable<Measurement<long>> ObserveWorkers() =>
        _workersByState.Select(kv => new Measurement<long>(kv.Value, new KeyValuePair<string, object?>("state", kv.Key)));

    /// <summary>Every state, zeros included, so a state the cluster has no job in reads 0 rather than nothing.</summary>
    IEnumerable<Measurement<long>> ObserveJobs()
    {
        var counts = _jobStates.Values.GroupBy(s => s.State).ToDictionary(g => g.Key, g => (long)g.Count());
        return Enum.GetValues<JobState>().Select(s => new Measurement<long>(counts.GetValueOrDefault(s), new KeyValuePair<string, object?>("state", StateName(s))));
    }

    /// <summary>
    /// Demand, not usage: a running job below its maxWorkers grows when workers come (a rescale), so its headroom counts;
    /// a pending job has not asked for workers yet and a finished one wants none. One value, 0 included, so a scaler
    /// always reads a number.
    /// </summary>
    Measurement<long> ObserveWorkersWanted() =>
        new(_jobStates.Values.Where(j => j.State is JobState.Forming or JobState.Running or JobState.Rescaling).Sum(j => (long)j.MaxWorkers));

    static string StateName(JobState state) => state.ToString().ToLowerInvariant();

    IEnumerable<Measurement<long>> ObserveGenerations() =>
        _generations.Select(kv => new Measurement<long>(kv.Value, new KeyValuePair<string, object?>("training_job", kv.Key)));

    IEnumerable<Measurement<double>> ObserveHeartbeats()
    {
        var now = _clock.GetUtcNow();
        return _heartbeats.Select(kv => new Measurement<double>(Math.Max(0, (now - kv.Value).TotalSeconds), new KeyValuePair<string, object?>("worker", kv.Key)));
    }
}
