// Cluster mode: one control stream to the Coordinator; each assignment becomes a training run of one generation.
using System.Net;
using System.Text.Json;
using System.Threading.Channels;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using Grpc.Core;
using Grpc.Net.Client;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// Connects with backoff, says Hello (device, memory, collective endpoint), then follows the Coordinator: an
/// Assignment (re)starts training for its generation, Stop ends it, a broken stream reconnects. Everything sent
/// up goes through one outbox so the stream has a single writer; heartbeats come from a timer that training
/// cannot block.
/// </summary>
/// <param name="metricsEndpoint">http://host:port of this process's /metrics, announced in Hello; empty when it serves none.</param>
/// <param name="readiness">What /health reports: registered or not; null where the process serves no health endpoint.</param>
public sealed class ClusterWorker(WorkerSettings settings, TextWriter log, TrainingMetrics? metrics = null, string metricsEndpoint = "", WorkerReadiness? readiness = null)
{
    readonly Channel<WorkerMessage> outbox = Channel.CreateUnbounded<WorkerMessage>();
    readonly Lock gate = new();
    /// <summary>Serialises the handling of Coordinator messages with a graceful leave.</summary>
    readonly SemaphoreSlim handling = new(1, 1);
    /// <summary>Set by SIGTERM/Ctrl+C or a Leave command: the reason to leave.</summary>
    readonly TaskCompletionSource<string> leave = new(TaskCreationOptions.RunContinuationsAsynchronously);
    /// <summary>The live model and optimizer, kept across the generations of one job.</summary>
    readonly ReplicaHolder replica = new();
    TrainingRun? run;
    Task? runTask;
    /// <summary>The export or evaluation share the Coordinator ordered last; awaited before the process ends.</summary>
    Task orderedWork = Task.CompletedTask;
    /// <summary>The assignment this process trains (or waits in, after a Rescale); announced in Hello on reconnect.</summary>
    Assignment? current;
    /// <summary>A message taken from the outbox whose write failed: sent first on the next connection, so nothing is lost.</summary>
    WorkerMessage? unsent;
    bool leaving;
    /// <summary>The Coordinator asked this worker to leave (not SIGTERM): with StayAfterLeave the process then stays out of the cluster.</summary>
    volatile bool leaveOrdered;
    /// <summary>Where this worker accepts the link from the pipeline stage before it (Worker__PipelinePort, or a free port).</summary>
    int pipelinePort;
    public WorkerProgress Progress { get; } = new();

    public async Task<int> RunAsync(CancellationToken stop)
    {
        // A CUDA worker all-reduces its gradients through NCCL: say now, not after its first assignment, that it cannot.
        var device = DeepSeekCluster.Training.Engine.StandaloneRun.ResolveDevice(settings.Device);
        if (Collective.BackendFor(device) == "nccl" && NcclCollective.Inspect().Problem is { } problem)
        {
            Log($"cannot train on {device}: the nccl backend cannot start: {problem} ('gpu-worker check' tells more; Worker__Device=cpu trains on the CPU)");
            return 1;
        }
        int port = settings.CollectivePort != 0 ? settings.CollectivePort : ReservePort();
        var endpoint = $"{settings.CollectiveHost}:{port}";
        pipelinePort = settings.PipelinePort != 0 ? settings.PipelinePort : ReservePort();
        Log($"worker {settings.WorkerId}: coordinator {settings.Coordinator}, collectives on {endpoint}, pipeline stage links on {settings.CollectiveHost}:{pipelinePort}");
        using var refusals = LinkRefusals.Subscribe(r => Log($"refused a {r.Link} link connection with {r.Remote}: {r.Reason}"));
        using var heartbeat = new Timer(_ => SendHeartbeat(), null, settings.HeartbeatInterval, settings.HeartbeatInterval);
        using var onStop = stop.Register(() => leave.TrySetResult("stopped (SIGTERM or Ctrl+C)"));
        var backoff = TimeSpan.FromMilliseconds(200);
        try
        {
            while (!leave.Task.IsCompleted)
            {
                try
                {
                    var outcome = await ConnectOnceAsync(endpoint, port);
                    if (outcome is 0 && leaveOrdered && settings.StayAfterLeave) return await StayOutAsync(stop);
                    if (outcome is { } code) return code;
                    backoff = TimeSpan.FromMilliseconds(200);
                }
                catch (RpcException e) when (!leave.Task.IsCompleted)
                {
                    Log($"control stream to {settings.Coordinator} lost ({e.StatusCode}: {e.Status.Detail}); reconnecting in {backoff.TotalSeconds:F1} s");
                }
                catch (HttpRequestException e) when (!leave.Task.IsCompleted)
                {
                    Log($"coordinator {settings.Coordinator} unreachable ({e.Message}); reconnecting in {backoff.TotalSeconds:F1} s");
                }
                catch (IOException e) when (!leave.Task.IsCompleted)
                {
                    // A Coordinator killed mid-write resets the socket under the request stream.
                    Log($"control stream to {settings.Coordinator} reset ({e.Message}); reconnecting in {backoff.TotalSeconds:F1} s");
                }
                catch (Exception e) when (leave.Task.IsCompleted && e is RpcException or HttpRequestException or IOException or OperationCanceledException)
                {
                    break;
                }
                // Training goes on peer to peer meanwhile; reports wait in the outbox.
                await Task.WhenAny(Task.Delay(backoff), leave.Task);
                backoff = TimeSpan.FromSeconds(Math.Min(5, backoff.TotalSeconds * 2));
            }
            // Leaving without a Coordinator to tell: finish the step and go.
            Log($"leaving ({await leave.Task}) without a connection to the coordinator");
            await StopRunAsync();
            return 0;
        }
        finally
        {
            // The training thread may still be in a step: it must end before its model and optimizer are freed.
            await StopRunAsync(now: true);
            await orderedWork;
            replica.Dispose();
        }
    }

    /// <summary>
    /// A leave stays a leave: an exit would be restarted by Kubernetes (restartPolicy Always) and rejoin, causing another
    /// rescale. Unready and idle until SIGTERM, which then ends the process with 0.
    /// </summary>
    async Task<int> StayOutAsync(CancellationToken stop)
    {
        readiness?.Disconnected("left the cluster at the coordinator's request; stays out until the pod is deleted");
        Log("left the cluster at the coordinator's request; staying out of it until stopped (Worker__StayAfterLeave)");
        try { await Task.Delay(Timeout.Infinite, stop); }
        catch (OperationCanceledException) { }
        return 0;
    }

    /// <summary>Ready once the Coordinator's response headers say Hello registered this worker on this stream.</summary>
    async Task MarkRegisteredAsync(AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> call)
    {
        if (readiness is null) return;
        try
        {
            var headers = await call.ResponseHeadersAsync;
            if (headers.GetValue(WorkerReadiness.RegisteredHeader) == "true" && !leave.Task.IsCompleted) readiness.Connected();
        }
        catch (Exception e) when (e is RpcException or IOException or OperationCanceledException or InvalidOperationException) { }
    }

    /// <summary>One connection: returns an exit code when the worker must stop, null to reconnect.</summary>
    async Task<int?> ConnectOnceAsync(string endpoint, int port)
    {
        using var channel = GrpcChannel.ForAddress(settings.Coordinator, new GrpcChannelOptions
        {
            HttpHandler = new SocketsHttpHandler
            {
                KeepAlivePingDelay = TimeSpan.FromSeconds(10), KeepAlivePingTimeout = TimeSpan.FromSeconds(5),
                EnableMultipleHttp2Connections = true,
                // Mutual TLS when Cluster__Tls__* are set: present this worker's certificate, trust only the cluster CA.
                SslOptions = settings.Tls?.ClientOptions() ?? new(),
            },
        });
        var client = new ClusterControl.ClusterControlClient(channel);
        using var connection = new CancellationTokenSource();
        using var call = client.Connect(new Metadata { { "authorization", $"Bearer {settings.Token}" } }, cancellationToken: connection.Token);
        var hello = new Hello
        {
            WorkerId = settings.WorkerId, Device = DeviceName(), Host = Environment.MachineName,
            MemoryBytes = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, CollectiveEndpoint = endpoint,
            PipelineEndpoint = $"{settings.CollectiveHost}:{pipelinePort}", MetricsEndpoint = metricsEndpoint,
        };
        // Still training a generation (the Coordinator restarted, or the stream broke): ask to be re-adopted into it.
        if (current is { } position && Progress.Generation == position.Generation)
        {
            hello.JobId = position.JobId;
            hello.Generation = position.Generation;
            hello.Rank = position.Rank;
        }
        await call.RequestStream.WriteAsync(new WorkerMessage { Hello = hello }, connection.Token);
        var registered = MarkRegisteredAsync(call);
        if (hello.Generation != 0)
        {
            StepReport[] again;
            lock (recentSteps) again = [.. recentSteps.Where(r => r.Generation == hello.Generation)];
            foreach (var r in again)
            {
                var copy = r.Clone();
                copy.Resent = true;
                await call.RequestStream.WriteAsync(new WorkerMessage { Step = copy }, connection.Token);
            }
            if (again.Length > 0) Log($"reconnected into generation {hello.Generation}: sent the last {again.Length} step reports again (the coordinator keeps what it lacks)");
        }
        var writer = Task.Run(async () =>
        {
            if (unsent is { } first)
            {
                await call.RequestStream.WriteAsync(first, connection.Token);
                unsent = null;
                Written(first);
            }
            await foreach (var m in outbox.Reader.ReadAllAsync(connection.Token))
            {
                unsent = m;
                await call.RequestStream.WriteAsync(m, connection.Token);
                unsent = null;
                Written(m);
            }
        }, connection.Token);
        var rejoin = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var reading = ReadAsync(call, port, rejoin, connection.Token);
        try
        {
            var first = await Task.WhenAny(reading, leave.Task, rejoin.Task);
            if (first == leave.Task) return await LeaveAsync(call, writer, reading, await leave.Task);
            if (first == rejoin.Task)
            {
                Log("rejoining the coordinator as a free worker");
                return null;
            }
            return await reading; // the coordinator closed the stream (null: reconnect) or refused the token (3)
        }
        finally
        {
            connection.Cancel();
            await registered; // first, so a late "registered" cannot follow the line below
            readiness?.Disconnected("control stream to the coordinator ended; reconnecting");
            // However the stream ended (closed, reset under a write, cancelled), this connection is over; the loop reconnects.
            try { await writer; } catch (OperationCanceledException) { } catch (RpcException) { } catch (InvalidOperationException) { } catch (IOException) { }
            try { await reading; } catch (OperationCanceledException) { } catch (RpcException) { } catch (IOException) { }
        }
    }

    async Task<int?> ReadAsync(AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> call, int port, TaskCompletionSource rejoin, CancellationToken ct)
    {
        await foreach (var message in call.ResponseStream.ReadAllAsync(ct))
        {
            await handling.WaitAsync(ct);
            try
            {
                if (leaving) continue;
                switch (message.KindCase)
                {
                    case CoordinatorMessage.KindOneofCase.Assignment:
                        await StartRunAsync(message.Assignment, port);
                        break;
                    case CoordinatorMessage.KindOneofCase.Stop:
                        Log($"stop from the coordinator (generation {message.Stop.Generation}): {message.Stop.Reason}");
                        Progress.Generation = 0; // unassigned: heartbeats no longer speak for a generation
                        current = null;
                        await StopRunAsync(now: true);
                        // Out of the job: a later claim must not trust this state (the job may have moved on without it).
                        replica.Drop();
                        break;
                    case CoordinatorMessage.KindOneofCase.Rescale:
                        Log($"rescale (generation {message.Rescale.Generation}): {message.Rescale.Reason}; waiting for the new assignment");
                        await StopRunAsync();
                        break;
                    case CoordinatorMessage.KindOneofCase.CheckpointNow:
                        run?.RequestCheckpoint(message.CheckpointNow.Step);
                        break;
                    case CoordinatorMessage.KindOneofCase.NcclUniqueId:
                        run?.DeliverNcclUniqueId(message.NcclUniqueId);
                        break;
                    case CoordinatorMessage.KindOneofCase.ExportCheckpoint:
                        var order = message.ExportCheckpoint;
                        Log($"export ordered: step {order.Step} of job {order.JobId} as {order.Format}");
                        // Off the read loop: an export takes seconds to minutes, and the stream must go on (heartbeats, Leave).
                        orderedWork = Task.Factory.StartNew(() => CheckpointExport.RunAsync(order, settings, log), TaskCreationOptions.LongRunning)
                            .Unwrap().ContinueWith(t => Send(new WorkerMessage { ExportFinished = t.Result }), TaskScheduler.Default);
                        break;
                    case CoordinatorMessage.KindOneofCase.EvaluateCheckpoint:
                        var share = message.EvaluateCheckpoint;
                        Log($"evaluation ordered: {share.EvaluationId}, rank {share.Rank}/{share.World} on step {share.Step} of job {share.JobId}");
                        // The ring listens on the collective port, free while no run holds it (the registry holds this worker).
                        orderedWork = Task.Factory.StartNew(() => EvaluationShare.RunAsync(share, settings, port, log, metrics), TaskCreationOptions.LongRunning)
                            .Unwrap().ContinueWith(t => Send(new WorkerMessage { EvaluationFinished = t.Result }), TaskScheduler.Default);
                        break;
                    case CoordinatorMessage.KindOneofCase.Leave:
                        Log($"asked to leave: {message.Leave.Reason}");
                        leaveOrdered = leave.TrySetResult(message.Leave.Reason);
                        break;
                    case CoordinatorMessage.KindOneofCase.Refused:
                        var refused = message.Refused;
                        Log($"refused by the coordinator: {refused.Reason}");
                        if (refused.Reason.Contains("token", StringComparison.OrdinalIgnoreCase)) return 3;
                        // Fenced as a zombie while still in that generation (an Assignment that moved us on wins): the run and
                        // its state are stale; drop both and say Hello again as a free worker.
                        if (refused.Rejoin && Progress.Generation == refused.StaleGeneration)
                        {
                            Log($"generation {refused.StaleGeneration} is stale: dropping the run and the live state");
                            Progress.Generation = 0;
                            current = null;
                            await StopRunAsync(now: true);
                            replica.Drop();
                            rejoin.TrySetResult();
                            return null;
                        }
                        break;
                }
            }
            finally { handling.Release(); }
        }
        return null;
    }

    /// <summary>
    /// Graceful leave: the step in flight finishes, Leaving goes up, the stream closes; exit code 0. The coordinator ends its
    /// side once it has read the farewell; until then the call stays open, since cancelling it (or exiting) resets the stream
    /// and the coordinator, which may not have read the farewell yet, would record the worker as lost instead of left.
    /// </summary>
    async Task<int> LeaveAsync(AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> call, Task writer, Task reading, string reason)
    {
        await handling.WaitAsync();
        try { leaving = true; }
        finally { handling.Release(); }
        long generation = Progress.Generation;
        await StopRunAsync();
        Log($"leaving: {reason}");
        Send(new WorkerMessage { Leaving = new Leaving { Reason = reason, Generation = generation } });
        outbox.Writer.TryComplete(); // the writer sends what is queued, the farewell last, then ends
        try
        {
            await writer.WaitAsync(TimeSpan.FromSeconds(5));
            await call.RequestStream.CompleteAsync();
            await reading.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception e) when (e is TimeoutException or RpcException or InvalidOperationException or OperationCanceledException or IOException)
        {
            Log($"the farewell may not have reached the coordinator: {e.Message}");
        }
        return 0;
    }

    async Task StartRunAsync(Assignment assignment, int port)
    {
        // Heartbeats speak for the new generation at once: the old run may need its step to finish first.
        Progress.Generation = assignment.Generation;
        await StopRunAsync();
        Log($"assignment: job {assignment.JobId}, generation {assignment.Generation}, rank {assignment.Rank}/{assignment.World}" +
            (assignment.ResumeStep > 0 ? $", resuming from step {assignment.ResumeStep}" : ""));
        Progress.Generation = assignment.Generation; // heartbeats speak for the new generation from now on
        Progress.Step = assignment.ResumeStep;
        current = assignment;
        var r = new TrainingRun(assignment, settings, port, Send, Progress, log, metrics, replica, pipelinePort);
        lock (gate) { run = r; runTask = Task.Factory.StartNew(r.Run, TaskCreationOptions.LongRunning); }
    }

    /// <summary>Ends the current run at its step boundary (a blocked collective is aborted after a grace); now: abort at once.</summary>
    async Task StopRunAsync(bool now = false)
    {
        TrainingRun? r;
        Task? t;
        lock (gate) { r = run; t = runTask; run = null; runTask = null; }
        if (r is null || t is null) return;
        r.Cancel(now);
        // Rank 0's end (the whole model's load, validation and export) runs on after the job's Stop, and a run may be held
        // by a wait that no cancellation reaches: say what it is doing rather than wait in silence.
        await WaitSayingAsync(t, () => $"the run of generation {r.Generation} (rank {r.Rank}) has not ended yet: {r.Doing}", RunEndReportEvery, Log);
    }

    /// <summary>How often a Stop, rescale or leave that waits for the run to end logs what the run is doing.</summary>
    internal static readonly TimeSpan RunEndReportEvery = TimeSpan.FromSeconds(30);

    /// <summary>Awaits <paramref name="run"/>, logging <paramref name="where"/> each <paramref name="every"/> it has not ended.</summary>
    internal static async Task WaitSayingAsync(Task run, Func<string> where, TimeSpan every, Action<string> log)
    {
        while (await Task.WhenAny(run, Task.Delay(every)) != run) log(where());
        await run;
    }

    void Send(WorkerMessage m) => outbox.Writer.TryWrite(m);

    /// <summary>
    /// Step reports already written to a stream, kept to send again after a reconnect that re-adopts their generation: a
    /// report written just before the Coordinator died reached its socket but was never processed, and the exactly-once
    /// ledger would show that step as a gap. Only written ones: a report still queued goes out once, unflagged. The
    /// Coordinator keeps a resent slice only where its ledger lacks it.
    /// </summary>
    readonly Queue<StepReport> recentSteps = new();
    const int RecentStepsKept = 64;

    void Written(WorkerMessage m)
    {
        if (m.KindCase != WorkerMessage.KindOneofCase.Step) return;
        lock (recentSteps)
        {
            recentSteps.Enqueue(m.Step);
            while (recentSteps.Count > RecentStepsKept) recentSteps.Dequeue();
        }
    }

    void SendHeartbeat()
    {
        var p = Progress;
        Send(new WorkerMessage
        {
            Heartbeat = new Heartbeat
            {
                Generation = p.Generation, Step = p.Step, Loss = p.Loss, TokensPerSecond = p.TokensPerSecond,
                MemoryUsedBytes = Environment.WorkingSet,
            },
        });
    }

    string DeviceName() => DeepSeekCluster.Training.Engine.StandaloneRun.ResolveDevice(settings.Device).ToString();

    static int ReservePort()
    {
        var l = new System.Net.Sockets.TcpListener(IPAddress.Any, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    void Log(string message) { lock (log) log.WriteLine(message); }
}

/// <summary>What the heartbeat reports: written by the training thread, read by the timer.</summary>
public sealed class WorkerProgress
{
    public long Generation;
    public long Step;
    public double Loss;
    public double TokensPerSecond;
}
