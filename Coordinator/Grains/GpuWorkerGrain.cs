// The coordinator-side actor of one worker process: capabilities, liveness, assignment, generation.
// Heartbeat times and metrics are liveness, not state: they live in memory only (a restart makes every worker reconnect).
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class GpuWorkerGrainState
{
    [Id(0)] public WorkerCapabilities? Capabilities { get; set; }
    [Id(1)] public bool Online { get; set; }
    [Id(2)] public Assignment? Assignment { get; set; }
    /// <summary>Counts connections, so the close of an old stream cannot take down a newer one.</summary>
    [Id(3)] public long Connection { get; set; }
    [Id(4)] public SavedModel? SavedModel { get; set; }
}

public sealed class GpuWorkerGrain(
    [PersistentState("worker")] IPersistentState<GpuWorkerGrainState> worker,
    IOptions<CoordinatorOptions> options,
    CoordinatorMetrics metrics,
    TimeProvider clock,
    ILogger<GpuWorkerGrain> logger) : Grain, IGpuWorkerGrain
{
    GpuWorkerGrainState S => worker.State;
    string WorkerId => this.GetPrimaryKeyString();
    IClusterRegistryGrain Registry => GrainFactory.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);

    IWorkerControlObserver? _observer;
    IGrainTimer? _watch;
    DateTimeOffset _lastHeartbeat;
    /// <summary>No heartbeat timeout before this: after a restart, workers need time to notice and reconnect.</summary>
    DateTimeOffset _graceUntil;
    WorkerMetrics? _metrics;
    /// <summary>The job of the assignment the worker lost last (a zombie's stale reports are attributed to it).</summary>
    string? _lastJob;

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        // Online before a restart: give the process the reconnect grace, else its job hears that it left.
        if (S.Online)
        {
            _graceUntil = clock.GetUtcNow() + options.Value.ReconnectGrace;
            StartWatch();
        }
        return Task.CompletedTask;
    }

    public async Task<long> RegisterAsync(WorkerCapabilities capabilities, IWorkerControlObserver? observer, TrainingPosition? training = null)
    {
        if (capabilities.WorkerId != WorkerId)
            throw new ArgumentException($"capabilities name worker '{capabilities.WorkerId}' but this is worker '{WorkerId}'");
        // The process still trains the generation it was assigned (the Coordinator restarted, or its stream broke and came
        // back): re-adopt it. Anything else is a new process, or one whose generation moved on: what it was doing is lost.
        var current = S.Assignment;
        bool adopt = current is not null && training is not null && training.JobId == current.JobId
                     && training.Generation == current.Generation && training.Rank == current.Rank;
        var lost = adopt ? null : current;
        if (!adopt) S.Assignment = null;
        // Online with an assignment it no longer trains: the process failed unseen and this is its successor.
        if (S.Online && lost is not null) metrics.WorkerLeft(LeaveKind.Lost);
        if (!S.Online || lost is not null) metrics.WorkerJoined();
        S.Capabilities = capabilities;
        S.Online = true;
        S.Connection++;
        _observer = observer;
        await worker.WriteStateAsync();
        StartWatch();
        logger.LogInformation("Worker {Worker} registered: {Device}, {Memory} bytes, host {Host}{Adopted}", WorkerId, capabilities.Device,
            capabilities.MemoryBytes, capabilities.Host, adopt ? $"; re-adopted into job {current!.JobId} generation {current.Generation} rank {current.Rank}" : "");
        if (adopt && observer is not null) await observer.AdoptedAsync(current!);
        if (lost is not null)
            await GrainFactory.GetGrain<ITrainingJobGrain>(lost.JobId).WorkerLeftAsync(WorkerId,
                training is null ? "reconnected without its assignment" : $"reconnected in generation {training.Generation}, not its assignment's {lost.Generation}",
                LeaveKind.Lost);
        await Registry.WorkerOnlineAsync(capabilities);
        return S.Connection;
    }

    public Task HeartbeatAsync(long generation, WorkerMetrics metrics1)
    {
        if (!S.Online)
        {
            // Its stream outlived the timeout that took it offline (paused, partitioned): a zombie.
            metrics.StaleRefused("heartbeat");
            TellFenced(generation, "heartbeat");
            throw new StaleGenerationException(_lastJob ?? "", generation, 0, rejoin: true);
        }
        // An online worker on its current stream is alive whatever generation it speaks for: one that is still finishing
        // the step of its previous generation has simply not read its new Assignment yet (not a zombie: a zombie's
        // stream outlived a timeout that took it offline, above).
        _lastHeartbeat = clock.GetUtcNow();
        metrics.Heartbeat(WorkerId, _lastHeartbeat);
        long expected = S.Assignment?.Generation ?? 0;
        if (generation != expected)
        {
            metrics.StaleRefused("heartbeat");
            throw new StaleGenerationException(S.Assignment?.JobId ?? _lastJob ?? "", generation, expected);
        }
        _metrics = metrics1;
        return Task.CompletedTask;
    }

    public async Task AssignAsync(Assignment assignment)
    {
        S.Assignment = assignment;
        await worker.WriteStateAsync();
        if (_observer is null) return;
        try { await _observer.AssignedAsync(assignment); }
        catch (Exception e) { logger.LogWarning(e, "Worker {Worker}: could not push generation {Generation} to its stream", WorkerId, assignment.Generation); }
    }

    public async Task<bool> LeaveAsync(string reason)
    {
        if (!S.Online || _observer is null) return false;
        try { await _observer.CommandedAsync(new ControlCommand { Kind = ControlCommandKind.Leave, JobId = S.Assignment?.JobId ?? "", Reason = reason }); }
        catch (Exception e)
        {
            logger.LogWarning(e, "Worker {Worker}: could not push Leave to its stream", WorkerId);
            return false;
        }
        logger.LogInformation("Worker {Worker} asked to leave: {Reason}", WorkerId, reason);
        return true;
    }

    public async Task CommandAsync(ControlCommand command)
    {
        if (S.Assignment is null || S.Assignment.JobId != command.JobId) return;
        if (command.Kind == ControlCommandKind.Stop)
        {
            S.Assignment = null;
            await worker.WriteStateAsync();
        }
        if (_observer is null) return;
        try { await _observer.CommandedAsync(command); }
        catch (Exception e) { logger.LogWarning(e, "Worker {Worker}: could not push {Command} to its stream", WorkerId, command.Kind); }
    }

    public async Task DisconnectedAsync(long connection, string reason, LeaveKind kind)
    {
        if (connection != S.Connection || !S.Online) return;
        await GoOfflineAsync(reason, kind);
    }

    public async Task ModelSavedAsync(string jobId, long step, string path)
    {
        S.SavedModel = new SavedModel(jobId, step, path, clock.GetUtcNow());
        await worker.WriteStateAsync();
    }

    public Task<bool> OrderExportAsync(ExportOrder order) => OrderAsync(o => o.ExportOrderedAsync(order), $"the export of {order.Job} step {order.Step}");

    public Task<bool> OrderEvaluationAsync(EvaluationOrder order) => OrderAsync(o => o.EvaluationOrderedAsync(order), $"evaluation {order.EvaluationId}");

    async Task<bool> OrderAsync(Func<IWorkerControlObserver, Task> push, string what)
    {
        if (!S.Online || _observer is null) return false;
        try { await push(_observer); }
        catch (Exception e)
        {
            logger.LogWarning(e, "Worker {Worker}: could not push {What} to its stream", WorkerId, what);
            return false;
        }
        return true;
    }

    public Task<WorkerStatus> GetAsync() => Task.FromResult(new WorkerStatus
    {
        WorkerId = WorkerId,
        Capabilities = S.Capabilities,
        Online = S.Online,
        LastHeartbeat = S.Online ? _lastHeartbeat : null,
        Generation = S.Assignment?.Generation ?? 0,
        Assignment = S.Assignment,
        Metrics = _metrics,
        SavedModel = S.SavedModel,
    });

    void TellFenced(long generation, string what)
    {
        if (generation <= 0 || (S.Assignment?.JobId ?? _lastJob) is not { } job) return;
        GrainFactory.GetGrain<ITrainingJobGrain>(job).WorkerFencedAsync(WorkerId, generation, what).Ignore();
    }

    async Task GoOfflineAsync(string reason, LeaveKind kind)
    {
        var left = S.Assignment;
        if (left is not null) _lastJob = left.JobId;
        S.Online = false;
        S.Assignment = null;
        _observer = null;
        _watch?.Dispose();
        _watch = null;
        metrics.WorkerGone(WorkerId);
        metrics.WorkerLeft(kind);
        await worker.WriteStateAsync();
        logger.LogWarning("Worker {Worker} went offline: {Reason}", WorkerId, reason);
        string? holder = await Registry.WorkerOfflineAsync(WorkerId);
        if (left is not null) await GrainFactory.GetGrain<ITrainingJobGrain>(left.JobId).WorkerLeftAsync(WorkerId, reason, kind);
        // Ordered work (an export, an evaluation share) ends with its worker. The stream's end tells it too while the
        // Coordinator runs; this is what tells it after a restart, when the stream is gone and the worker never came back.
        await OrderedWork.WorkerLostAsync(GrainFactory, holder, WorkerId, reason);
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        metrics.WorkerGone(WorkerId);
        return Task.CompletedTask;
    }

    void StartWatch()
    {
        _lastHeartbeat = clock.GetUtcNow();
        metrics.Heartbeat(WorkerId, _lastHeartbeat);
        if (_watch is not null) return;
        var timeout = options.Value.HeartbeatTimeout;
        var period = TimeSpan.FromTicks(Math.Max(timeout.Ticks / 4, TimeSpan.FromMilliseconds(50).Ticks));
        _watch = this.RegisterGrainTimer(async _ =>
        {
            var now = clock.GetUtcNow();
            if (!S.Online || now - _lastHeartbeat <= timeout || now < _graceUntil) return;
            var observer = _observer;
            await GoOfflineAsync($"no heartbeat for {timeout.TotalSeconds:0.###} s", LeaveKind.Hung);
            if (observer is not null)
            {
                try { await observer.CommandedAsync(new ControlCommand { Kind = ControlCommandKind.Stop, Reason = "heartbeat timeout" }); }
                catch (Exception e) { logger.LogDebug(e, "Worker {Worker}: stop after heartbeat timeout not delivered", WorkerId); }
            }
        }, new GrainTimerCreationOptions { DueTime = period, Period = period, KeepAlive = true });
    }
}
