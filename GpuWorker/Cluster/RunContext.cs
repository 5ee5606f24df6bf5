// What every part of one generation's run shares: the assignment, the worker's settings, the way up to the Coordinator,
// the log, the metrics, the run's cancellation and the live state kept across generations.
using DeepSeekCluster.Contracts.Control;

namespace DeepSeekCluster.GpuWorker.Cluster;

sealed class RunContext(Assignment assignment, WorkerSettings settings, Action<WorkerMessage> send, TextWriter log,
                        TrainingMetrics? metrics, RunCancellation cancel, ReplicaHolder holder)
{
    public Assignment Assignment { get; } = assignment;
    public WorkerSettings Settings { get; } = settings;
    public TrainingMetrics? Metrics { get; } = metrics;
    public RunCancellation Cancel { get; } = cancel;
    public ReplicaHolder Holder { get; } = holder;
    public string JobId => Assignment.JobId;
    public string WorkerId => Settings.WorkerId;
    public int Rank => Assignment.Rank;

    long checkpointRequested = -1;
    long lastStepTicks = TimeSpan.FromSeconds(1).Ticks;

    /// <summary>The Coordinator asked for a checkpoint of <paramref name="step"/> (CheckpointNow).</summary>
    public void RequestCheckpoint(long step) => Interlocked.Exchange(ref checkpointRequested, step);

    /// <summary>Whether a checkpoint of <paramref name="step"/> was asked for; the request is used up either way.</summary>
    public bool TakeCheckpointRequest(long step) => Interlocked.Exchange(ref checkpointRequested, -1) == step;

    /// <summary>How long the last step took (a second before the first): what the abort grace is measured by.</summary>
    public TimeSpan LastStep
    {
        get => TimeSpan.FromTicks(Interlocked.Read(ref lastStepTicks));
        set => Interlocked.Exchange(ref lastStepTicks, value.Ticks);
    }

    sealed record Activity(string What, long Since);
    Activity doing = new("starting", System.Diagnostics.Stopwatch.GetTimestamp());

    /// <summary>
    /// What the run's thread is doing now, and since when: set before each long wait of a step and of the end, so that a
    /// Stop or rescale that waits for the run to end can say where it stands (ClusterWorker) instead of staying silent.
    /// </summary>
    public string Doing
    {
        get => Volatile.Read(ref doing).What;
        set => Volatile.Write(ref doing, new Activity(value, System.Diagnostics.Stopwatch.GetTimestamp()));
    }

    /// <summary><see cref="Doing"/> with how long it has been going on, for a log line.</summary>
    public string DoingFor
    {
        get
        {
            var now = Volatile.Read(ref doing);
            return $"{now.What} (for {System.Diagnostics.Stopwatch.GetElapsedTime(now.Since).TotalSeconds:0} s)";
        }
    }

    public void Send(WorkerMessage message) => send(message);

    public void Log(string message) { lock (log) log.WriteLine($"[rank {Assignment.Rank}] {message}"); }

    public string EndpointOf(IDictionary<int, string> endpoints, int rank, string what) =>
        endpoints.TryGetValue(rank, out var e) && e.Length > 0 ? e
            : throw new InvalidDataException($"the assignment lists no {what} endpoint for rank {rank}");
}
