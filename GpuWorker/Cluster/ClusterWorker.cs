// Cluster mode: one control stream to the Coordinator; each assignment becomes a training run of one generation.
using System.Net;
using System.Text.Json;
using System.Threading.Channels;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
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
public sealed class ClusterWorker(WorkerSettings settings, TextWriter log, TrainingMetrics? metrics = null)
{
    readonly Channel<WorkerMessage> outbox = Channel.CreateUnbounded<WorkerMessage>();
    readonly Lock gate = new();
    TrainingRun? run;
    Task? runTask;
    public WorkerProgress Progress { get; } = new();

    public async Task<int> RunAsync(CancellationToken stop)
    {
        int port = settings.CollectivePort != 0 ? settings.CollectivePort : ReservePort();
        var endpoint = $"{settings.CollectiveHost}:{port}";
        Log($"worker {settings.WorkerId}: coordinator {settings.Coordinator}, collectives on {endpoint}");
        using var heartbeat = new Timer(_ => SendHeartbeat(), null, settings.HeartbeatInterval, settings.HeartbeatInterval);
        var backoff = TimeSpan.FromMilliseconds(200);
        while (!stop.IsCancellationRequested)
        {
            try
            {
                var outcome = await ConnectOnceAsync(endpoint, port, stop);
                if (outcome is { } code) return code;
                backoff = TimeSpan.FromMilliseconds(200);
            }
            catch (Exception e) when (stop.IsCancellationRequested && e is RpcException or OperationCanceledException)
            {
                break;
            }
            catch (RpcException e)
            {
                Log($"control stream to {settings.Coordinator} lost ({e.StatusCode}: {e.Status.Detail}); reconnecting in {backoff.TotalSeconds:F1} s");
            }
            catch (HttpRequestException e)
            {
                Log($"coordinator {settings.Coordinator} unreachable ({e.Message}); reconnecting in {backoff.TotalSeconds:F1} s");
            }
            try { await Task.Delay(backoff, stop); } catch (OperationCanceledException) { break; }
            backoff = TimeSpan.FromSeconds(Math.Min(5, backoff.TotalSeconds * 2));
        }
        await LeaveAsync("stopped (SIGTERM or Ctrl+C)");
        return 0;
    }

    /// <summary>One connection: returns an exit code when the worker must stop, null to reconnect.</summary>
    async Task<int?> ConnectOnceAsync(string endpoint, int port, CancellationToken stop)
    {
        using var channel = GrpcChannel.ForAddress(settings.Coordinator, new GrpcChannelOptions
        {
            HttpHandler = new SocketsHttpHandler
            {
                KeepAlivePingDelay = TimeSpan.FromSeconds(10), KeepAlivePingTimeout = TimeSpan.FromSeconds(5),
                EnableMultipleHttp2Connections = true,
            },
        });
        var client = new ClusterControl.ClusterControlClient(channel);
        using var call = client.Connect(new Metadata { { "authorization", $"Bearer {settings.Token}" } }, cancellationToken: stop);
        using var connection = CancellationTokenSource.CreateLinkedTokenSource(stop);
        await call.RequestStream.WriteAsync(new WorkerMessage
        {
            Hello = new Hello
            {
                WorkerId = settings.WorkerId, Device = DeviceName(), Host = Environment.MachineName,
                MemoryBytes = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, CollectiveEndpoint = endpoint,
            },
        }, stop);
        var writer = Task.Run(async () =>
        {
            await foreach (var m in outbox.Reader.ReadAllAsync(connection.Token))
                await call.RequestStream.WriteAsync(m, connection.Token);
        }, connection.Token);
        try
        {
            await foreach (var message in call.ResponseStream.ReadAllAsync(stop))
            {
                switch (message.KindCase)
                {
                    case CoordinatorMessage.KindOneofCase.Assignment:
                        await StartRunAsync(message.Assignment, port);
                        break;
                    case CoordinatorMessage.KindOneofCase.Stop:
                        Log($"stop from the coordinator (generation {message.Stop.Generation}): {message.Stop.Reason}");
                        Progress.Generation = 0; // unassigned: heartbeats no longer speak for a generation
                        await StopRunAsync();
                        break;
                    case CoordinatorMessage.KindOneofCase.Rescale:
                        Log($"rescale (generation {message.Rescale.Generation}): {message.Rescale.Reason}; waiting for the new assignment");
                        await StopRunAsync();
                        break;
                    case CoordinatorMessage.KindOneofCase.CheckpointNow:
                        run?.RequestCheckpoint(message.CheckpointNow.Step);
                        break;
                    case CoordinatorMessage.KindOneofCase.Refused:
                        Log($"refused by the coordinator: {message.Refused.Reason}");
                        if (message.Refused.Reason.Contains("token", StringComparison.OrdinalIgnoreCase)) return 3;
                        break;
                }
            }
        }
        finally
        {
            connection.Cancel();
            try { await writer; } catch (OperationCanceledException) { } catch (RpcException) { }
        }
        return null; // the coordinator closed the stream: reconnect
    }

    async Task StartRunAsync(Assignment assignment, int port)
    {
        await StopRunAsync();
        Log($"assignment: job {assignment.JobId}, generation {assignment.Generation}, rank {assignment.Rank}/{assignment.World}" +
            (assignment.ResumeStep > 0 ? $", resuming from step {assignment.ResumeStep}" : ""));
        Progress.Generation = assignment.Generation; // heartbeats speak for the new generation from now on
        Progress.Step = assignment.ResumeStep;
        var r = new TrainingRun(assignment, settings, port, Send, Progress, log, metrics);
        lock (gate) { run = r; runTask = Task.Factory.StartNew(r.Run, TaskCreationOptions.LongRunning); }
    }

    async Task StopRunAsync()
    {
        TrainingRun? r;
        Task? t;
        lock (gate) { r = run; t = runTask; run = null; runTask = null; }
        if (r is null || t is null) return;
        r.Cancel();
        await t;
    }

    async Task LeaveAsync(string reason)
    {
        await StopRunAsync();
        Send(new WorkerMessage { Leaving = new Leaving { Reason = reason, Generation = Progress.Generation } });
        await Task.Delay(200); // give the writer a moment to flush the farewell before the process exits
    }

    void Send(WorkerMessage m) => outbox.Writer.TryWrite(m);

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
