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
    WorkerMetrics? _metrics;

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        // Online before a restart: give the process one timeout to reconnect, else its job hears that it left.
        if (S.Online) StartWatch();
        return Task.CompletedTask;
    }

    public async Task<long> RegisterAsync(WorkerCapabilities capabilities, IWorkerControlObserver? observer)
    {
        if (capabilities.WorkerId != WorkerId)
            throw new ArgumentException($"capabilities name worker '{capabilities.WorkerId}' but this is worker '{WorkerId}'");
        // A new connection is a new process (or the same one after a break): whatever it was doing is lost.
        var lost = S.Assignment;
        S.Assignment = null;
        S.Capabilities = capabilities;
        S.Online = true;
        S.Connection++;
        _observer = observer;
        await worker.WriteStateAsync();
        StartWatch();
        logger.LogInformation("Worker {Worker} registered: {Device}, {Memory} bytes, host {Host}", WorkerId, capabilities.Device, capabilities.MemoryBytes, capabilities.Host);
        if (lost is not null)
            await GrainFactory.GetGrain<ITrainingJobGrain>(lost.JobId).WorkerLeftAsync(WorkerId, "reconnected without its assignment");
        await Registry.WorkerOnlineAsync(capabilities);
        return S.Connection;
    }

    public Task HeartbeatAsync(long generation, WorkerMetrics metrics1)
    {
        if (!S.Online) throw new InvalidOperationException($"worker '{WorkerId}' is not registered; say Hello first");
        long expected = S.Assignment?.Generation ?? 0;
        if (generation != expected)
        {
            metrics.StaleRefused("heartbeat");
            throw new StaleGenerationException(S.Assignment?.JobId ?? "", generation, expected);
        }
        _lastHeartbeat = clock.GetUtcNow();
        metrics.Heartbeat(WorkerId, _lastHeartbeat);
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

    public async Task DisconnectedAsync(long connection, string reason)
    {
        if (connection != S.Connection || !S.Online) return;
        await GoOfflineAsync(reason);
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
    });

    async Task GoOfflineAsync(string reason)
    {
        var left = S.Assignment;
        S.Online = false;
        S.Assignment = null;
        _observer = null;
        _watch?.Dispose();
        _watch = null;
        metrics.WorkerGone(WorkerId);
        await worker.WriteStateAsync();
        logger.LogWarning("Worker {Worker} went offline: {Reason}", WorkerId, reason);
        await Registry.WorkerOfflineAsync(WorkerId);
        if (left is not null) await GrainFactory.GetGrain<ITrainingJobGrain>(left.JobId).WorkerLeftAsync(WorkerId, reason);
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
            if (!S.Online || clock.GetUtcNow() - _lastHeartbeat <= timeout) return;
            var observer = _observer;
            await GoOfflineAsync($"no heartbeat for {timeout.TotalSeconds:0.###} s");
            if (observer is not null)
            {
                try { await observer.CommandedAsync(new ControlCommand { Kind = ControlCommandKind.Stop, Reason = "heartbeat timeout" }); }
                catch (Exception e) { logger.LogDebug(e, "Worker {Worker}: stop after heartbeat timeout not delivered", WorkerId); }
            }
        }, new GrainTimerCreationOptions { DueTime = period, Period = period, KeepAlive = true });
    }
}
