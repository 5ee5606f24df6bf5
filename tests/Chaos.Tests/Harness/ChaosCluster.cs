// The cluster as real processes — Azurite, DataShardService, CheckpointStore, Coordinator and GpuWorkers, started with
// the AppHost's resource model — plus the faults the chaos scenarios inject: signals to a worker or the coordinator,
// a coordinator restart on the same ports and state, Azurite stopped and restarted on its data folder, workers added
// or asked to leave, and a worker's network cut inside its own namespace.
using System.Collections.Concurrent;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Reflection;
using System.Security.Cryptography;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.DataShards;
using Grpc.Net.Client;

namespace DeepSeekCluster.Chaos;

public sealed record ChaosClusterOptions
{
    /// <summary>Everything of the run goes here (state, checkpoints, datasets, models); every process mentions it.</summary>
    public required string RunDir { get; init; }
    /// <summary>Create a network namespace so <see cref="ChaosCluster.AddWorker"/> can place a worker behind a cuttable link.</summary>
    public bool NetworkNamespace { get; init; }
    public TimeSpan HeartbeatTimeout { get; init; } = TimeSpan.FromSeconds(5);
    public TimeSpan HeartbeatInterval { get; init; } = TimeSpan.FromSeconds(1);
    /// <summary>
    /// How long a collective waits for a silent peer before it fails the step. The worker's default (30 s): a re-formation
    /// aborts a blocked collective without waiting for it, and a shorter timeout fails healthy steps on a loaded machine
    /// (10 s did: a freshly joined rank's first step took longer there).
    /// </summary>
    public TimeSpan CollectiveTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Where the harness reports what it does (test output, console).</summary>
    public Action<string> Log { get; init; } = _ => { };
}

public static class Signals
{
    public const int Kill = 9, Term = 15, Cont = 18, Stop = 19;
}

public sealed class ChaosCluster : IAsyncDisposable
{
    const string BlobAccountKey = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="; // Azurite's published development key
    static readonly Dictionary<string, string> Meta = typeof(ChaosCluster).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .ToDictionary(a => a.Key, a => a.Value ?? "");

    public ChaosClusterOptions Options { get; }
    public DistributedApplication App { get; }
    public string Token { get; }
    public NetworkNamespace? Namespace { get; }
    public string RestUrl => coordinator.GetEndpoint("http").Url;
    public string WorkersDir => Path.Combine(Options.RunDir, "workers");
    public IReadOnlyCollection<string> StartedWorkers => workers.Keys.ToList();

    readonly Resource coordinator, dataShards, checkpoints;
    readonly DistributedApplicationBuilder factory;
    readonly HttpClient http;
    readonly ConcurrentDictionary<string, bool> workers = new(); // instance → in the namespace
    readonly ConcurrentQueue<(DateTime At, string Instance, string Line)> lines = new();
    readonly HashSet<string> stopped = new();
    readonly ConcurrentDictionary<string, bool> unstoppedJobs = new(); // jobs StopJobAsync could not reach (the coordinator was down)
    int nextWorker;

    /// <summary>The services in the order they start (each waits for the ones before it).</summary>
    static readonly string[] Services = [ServiceNames.Blobs, ServiceNames.DataShards, ServiceNames.Checkpoints, ServiceNames.Coordinator];

    ChaosCluster(ChaosClusterOptions options, DistributedApplication app, DistributedApplicationBuilder factory, string token,
                 NetworkNamespace? ns, Resource coordinator, Resource dataShards, Resource checkpoints)
    {
        Options = options; App = app; this.factory = factory; Token = token; Namespace = ns;
        this.coordinator = coordinator; this.dataShards = dataShards; this.checkpoints = checkpoints;
        // Generous: a cold coordinator activates its grains slowly on a loaded 2-core machine (a submit took > 10 s there).
        http = new HttpClient { BaseAddress = new Uri(RestUrl), Timeout = TimeSpan.FromSeconds(100) };
        // If the host process is told to stop (SIGTERM to a test run), take the children along instead of orphaning them.
        AppDomain.CurrentDomain.ProcessExit += KillAllOnExit;
        app.LineReceived += (instance, line) =>
        {
            lines.Enqueue((DateTime.UtcNow, instance, line));
            while (lines.Count > 20000) lines.TryDequeue(out _);
        };
    }

    static string RepositoryRoot => Meta.TryGetValue("RepositoryRoot", out var r) ? r : throw new InvalidOperationException("the assembly carries no RepositoryRoot metadata");

    /// <summary>Starts storage, the data and checkpoint services and the coordinator (no worker yet) and waits until each is healthy.</summary>
    public static async Task<ChaosCluster> StartAsync(ChaosClusterOptions options, CancellationToken ct)
    {
        Directory.CreateDirectory(options.RunDir);
        string azurite = Which("azurite-blob") ?? throw new InvalidOperationException(
            "azurite-blob is not on PATH: the chaos scenarios stop and restart real Azurite (npm install -g azurite)");
        NetworkNamespace? ns = options.NetworkNamespace ? NetworkNamespace.Create() : null;
        var builder = new DistributedApplicationBuilder(RepositoryRoot, Meta["BuildConfiguration"]);
        DistributedApplication? app = null;
        try
        {
            var token = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(32));
            int blobPort = FreePort.Next();
            var blobs = builder.AddExecutable(ServiceNames.Blobs, azurite, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose",
                "--blobHost", "127.0.0.1", "--blobPort", blobPort.ToString(), "--location", Path.Combine(options.RunDir, "azurite"));
            blobs.ReadinessPort = blobPort;
            var blobConnection = $"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={BlobAccountKey};" +
                                 $"BlobEndpoint=http://127.0.0.1:{blobPort}/devstoreaccount1;";
            var dataShards = builder.AddProject(ServiceNames.DataShards, "DataShardService", "DeepSeekCluster.DataShardService")
                .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
                .WithEnvironment("DataShards__Root", Path.Combine(options.RunDir, "datasets"))
                .WithEnvironment("DataShards__WorkDir", Path.Combine(options.RunDir, "prepare"))
                .WithEnvironment("DataShards__CacheDir", Path.Combine(options.RunDir, "shard-cache"))
                .WithConnectionString(ServiceNames.Blobs, blobConnection).WaitFor(blobs);
            var checkpoints = builder.AddProject(ServiceNames.Checkpoints, "CheckpointStore", "CheckpointStore")
                .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
                .WithEnvironment("Storage__Folder", Path.Combine(options.RunDir, "checkpoints"))
                // An outage scenario waits for uploads to fail: 2 quick tries instead of the default ~15 s of backoff per request.
                .WithEnvironment("Storage__RetryCount", "2")
                .WithEnvironment("Storage__RetryBaseDelayMs", "200")
                .WithConnectionString(ServiceNames.Blobs, blobConnection).WaitFor(blobs);
            var coordinator = builder.AddProject(ServiceNames.Coordinator, "Coordinator", "DeepSeekCluster.Coordinator")
                .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
                .WithReference(checkpoints).WaitFor(checkpoints)
                .WithEnvironment("Cluster__Token", token)
                .WithEnvironment("Coordinator__StateFolder", Path.Combine(options.RunDir, "coordinator"))
                .WithEnvironment("Coordinator__HeartbeatTimeout", options.HeartbeatTimeout.ToString("c"))
                .WithEnvironment("Orleans__SiloPort", FreePort.Next().ToString())
                .WithEnvironment("Orleans__GatewayPort", FreePort.Next().ToString());
            if (ns is not null)
                foreach (var r in new[] { dataShards, checkpoints, coordinator })
                    foreach (var e in r.Endpoints) // all interfaces, so a worker in the namespace reaches them at the host end's address
                        r.WithEnvironment($"Kestrel__Endpoints__{e.Name}__Url", $"http://0.0.0.0:{e.Port}");
            app = builder.Build();
            options.Log($"starting the services in {options.RunDir}{(ns is null ? "" : $" (namespace {ns.Name}, host end {ns.HostAddress})")}");
            await app.StartAsync(ct);
            return new ChaosCluster(options, app, new DistributedApplicationBuilder(RepositoryRoot, Meta["BuildConfiguration"]),
                                    token, ns, coordinator, dataShards, checkpoints);
        }
        catch
        {
            if (app is not null) await app.DisposeAsync();
            ns?.Dispose();
            throw;
        }
    }

    // ---- Data and jobs ----

    /// <summary>Prepares the shipped corpus (or reuses it: the dataset id is a content address) and returns the dataset id.</summary>
    public async Task<string> PrepareCorpusAsync(int seqLen, int vocabSize, CancellationToken ct)
    {
        using var channel = GrpcChannel.ForAddress(dataShards.GetEndpoint("grpc").Url);
        var reply = await new DataShards.DataShardsClient(channel).PrepareAsync(new PrepareRequest
        {
            Sources = { new Source { Name = "kjv", Path = Path.Combine(RepositoryRoot, "data", "corpus", "kjv.txt.gz"), Weight = 1 } },
            SeqLen = seqLen, VocabSize = vocabSize,
        }, deadline: DateTime.UtcNow.AddMinutes(10), cancellationToken: ct);
        Options.Log($"dataset {reply.DatasetId}: {reply.TrainSamples} train samples of {seqLen} tokens{(reply.Reused ? " (reused)" : "")}");
        return reply.DatasetId;
    }

    /// <summary>The job's committed steps as the CheckpointStore itself lists them (ascending).</summary>
    public async Task<List<long>> CommittedInStoreAsync(string jobId, CancellationToken ct)
    {
        using var channel = GrpcChannel.ForAddress(checkpoints.GetEndpoint("grpc").Url);
        var reply = await new Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient(channel).ListCheckpointsAsync(new ListCheckpointsRequest { Job = jobId }, cancellationToken: ct);
        return [.. reply.Checkpoints.Select(c => c.Step)];
    }

    public async Task<string> SubmitAsync(ChaosJob job, string datasetId, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/jobs") { Content = JsonContent.Create(job.ToSpec(datasetId)) };
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", Token);
        using var response = await http.SendAsync(request, ct);
        var body = await response.Content.ReadAsStringAsync(ct);
        if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"the coordinator refused job {job.Name} ({(int)response.StatusCode}): {body}");
        Options.Log($"submitted {job.Name}: {job.Steps} steps, global batch {job.GlobalBatch}, workers {job.MinWorkers}..{job.MaxWorkers}");
        return job.Name;
    }

    /// <summary>Stops a job that has not ended (POST /jobs/{id}/stop), so it cannot claim the workers of whatever runs next.</summary>
    /// <remarks>
    /// While the coordinator is down the job cannot be stopped; it is remembered, and <see cref="EnsureServicesRunningAsync"/>
    /// stops it once a coordinator answers again, before its waking job can claim the next scenario's workers.
    /// </remarks>
    public async Task StopJobAsync(string jobId, CancellationToken ct)
    {
        if (App.HasExited(ServiceNames.Coordinator))
        {
            unstoppedJobs[jobId] = true;
            Options.Log($"not stopping {jobId} now: the coordinator is not running");
            return;
        }
        if (await TryGetJobAsync(jobId, ct) is not { Terminal: false }) return;
        using var request = new HttpRequestMessage(HttpMethod.Post, $"/jobs/{jobId}/stop");
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", Token);
        using var response = await http.SendAsync(request, ct);
        Options.Log($"stopped {jobId}: {(int)response.StatusCode}");
        unstoppedJobs.TryRemove(jobId, out _);
    }

    /// <summary>The job's status, or null while the coordinator does not answer (it may be down on purpose).</summary>
    public async Task<JobView?> TryGetJobAsync(string jobId, CancellationToken ct)
    {
        try { return JobView.Parse(await http.GetStringAsync($"/jobs/{jobId}", ct)); }
        catch (Exception e) when (e is HttpRequestException || e is TaskCanceledException && !ct.IsCancellationRequested) { return null; }
    }

    /// <summary>
    /// Polls the job until <paramref name="condition"/> holds; fails early if the job ends without it, unless
    /// <paramref name="afterEnd"/> says the condition is one that comes true after the job ended (its final checkpoint).
    /// </summary>
    public async Task<JobView> WaitForAsync(string jobId, Func<JobView, bool> condition, TimeSpan timeout, string what, CancellationToken ct,
                                            TimeSpan? poll = null, bool afterEnd = false)
    {
        var deadline = DateTime.UtcNow + timeout;
        JobView? last = null;
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            if (await TryGetJobAsync(jobId, ct) is { } view)
            {
                last = view;
                if (condition(view)) return view;
                if (view.Terminal && !afterEnd) throw new InvalidOperationException($"waiting for {what}, the job ended first: {view.Describe()}");
            }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"{what} did not happen within {timeout.TotalSeconds:F0} s; {last?.Describe() ?? "the coordinator never answered"}\n{RecentLines(40)}\n{ManagedStacks.OfProcessesMentioning(Options.RunDir)}");
            await Task.Delay(poll ?? TimeSpan.FromMilliseconds(200), ct);
        }
    }

    /// <summary>
    /// Waits for the job to complete and for rank 0's model in the store; returns the final status and the weights file,
    /// downloaded from the store's hf export of the final step (no worker keeps the model on its disk).
    /// </summary>
    public async Task<(JobView Job, string ModelFile)> WaitForCompletionAsync(string jobId, TimeSpan timeout, CancellationToken ct)
    {
        var job = await WaitForAsync(jobId, j => j.State == "completed", timeout, $"completion of {jobId}", ct);
        // Rank 0 evaluates, samples and puts the model into the store after its last step; its log line says the export committed.
        string place = $"model saved to the checkpoint store as exports/{jobId}/";
        await WaitForLineAsync(l => l.Contains(place), TimeSpan.FromMinutes(3), $"rank 0 putting the model of {jobId} into the store", ct);
        // The final checkpoint commits after the last step report; the ledger and committed list are final then.
        job = await WaitForAsync(jobId, j => j.CommittedSteps.Contains(j.Step) || j.Step == 0, TimeSpan.FromMinutes(2), $"the final checkpoint of {jobId}", ct,
                                 afterEnd: true);
        var file = await StoredModel.DownloadWeightsAsync(checkpoints.GetEndpoint("grpc").Url, null, jobId, job.Step,
                                                          Path.Combine(Options.RunDir, "models", jobId, "model.safetensors"), ct);
        return (job, file);
    }

    /// <summary>Waits for a child's stdout line (written at or after <paramref name="since"/>, when given) that matches.</summary>
    public async Task WaitForLineAsync(Func<string, bool> match, TimeSpan timeout, string what, CancellationToken ct, DateTime? since = null)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!lines.Any(l => l.At >= (since ?? DateTime.MinValue) && match(l.Line)))
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{what}: no such log line within {timeout.TotalSeconds:F0} s\n{RecentLines(40)}\n{ManagedStacks.OfProcessesMentioning(Options.RunDir)}");
            await Task.Delay(200, ct);
        }
    }

    public string RecentLines(int n) => "recent output:\n" + string.Join("\n", lines.TakeLast(n).Select(l => $"  {l.At:HH:mm:ss.fff} [{l.Instance}] {l.Line}"));

    // ---- Workers ----

    /// <summary>
    /// Starts one more gpu-worker (inside the network namespace when asked); returns its instance, which is its worker id.
    /// <paramref name="torchThreads"/>: its intra-op threads (OMP_NUM_THREADS); the cluster bench compares 1 and 2.
    /// </summary>
    public string AddWorker(bool inNamespace = false, TimeSpan? heartbeatInterval = null, int torchThreads = 1)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(torchThreads, 1);
        if (inNamespace && Namespace is null) throw new InvalidOperationException("this cluster was started without a network namespace");
        var r = factory.AddProject(ServiceNames.GpuWorker, "GpuWorker", "gpu-worker").WithArgs("join").WithReplicas(1); // instances gpu-worker-N
        string host = Namespace?.HostAddress ?? "127.0.0.1";
        foreach (var s in new[] { coordinator, dataShards, checkpoints })
            foreach (var e in s.Endpoints)
                r.WithEnvironment($"services__{s.Name}__{e.Name}__0", inNamespace ? $"http://{host}:{e.Port}" : e.Url);
        r.WithEnvironment("Cluster__Token", Token)
            .WithEnvironment("Worker__OutputDir", WorkersDir)
            .WithEnvironment("Worker__Device", "cpu")
            // Peers dial this address: the namespace end for a worker inside it, the host end (reachable from both sides) otherwise.
            .WithEnvironment("Worker__CollectiveHost", inNamespace ? Namespace!.InnerAddress : host)
            .WithEnvironment("Worker__HeartbeatInterval", (heartbeatInterval ?? Options.HeartbeatInterval).ToString("c"))
            .WithEnvironment("Worker__CollectiveTimeout", Options.CollectiveTimeout.ToString("c"))
            .WithEnvironment("Kestrel__Endpoints__http__Url", "http://127.0.0.1:0")
            // One intra-op thread per worker by default: several workers share a small machine, and oversubscribed torch threads
            // make every step (and so every scenario) many times slower.
            .WithEnvironment("OMP_NUM_THREADS", torchThreads.ToString()).WithEnvironment("MKL_NUM_THREADS", torchThreads.ToString());
        var run = r;
        if (inNamespace)
        {
            run = new Resource { Name = r.Name, Command = "ip", IsProject = false, Numbered = true };
            run.Args.AddRange(Namespace!.ExecPrefix);
            run.Args.Add(r.Command);
            run.Args.AddRange(r.Args);
            foreach (var (k, v) in r.Environment) run.Environment[k] = v;
        }
        var instance = App.Start(run, Interlocked.Increment(ref nextWorker) - 1);
        workers[instance] = inNamespace;
        Options.Log($"added {instance}{(inNamespace ? " in the namespace" : "")} (pid {App.Pid(instance)})");
        return instance;
    }

    public int Pid(string instance) => App.Pid(instance) ?? throw new InvalidOperationException($"no instance '{instance}'");

    public void Signal(string instance, int signal)
    {
        Options.Log($"signal {signal} to {instance} (pid {Pid(instance)})");
        if (signal == Signals.Stop) lock (stopped) stopped.Add(instance);
        if (signal is Signals.Cont or Signals.Kill) lock (stopped) stopped.Remove(instance);
        App.Signal(instance, signal);
    }

    public async Task WaitForExitAsync(string instance, TimeSpan timeout, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!App.HasExited(instance))
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{instance} (pid {Pid(instance)}) did not exit within {timeout.TotalSeconds:F0} s");
            await Task.Delay(50, ct);
        }
    }

    /// <summary>
    /// Waits until every named worker is registered, online and unassigned (GET /workers), so a job submitted next forms
    /// with all of them at once instead of growing worker by worker.
    /// </summary>
    public async Task WaitForIdleWorkersAsync(IReadOnlyCollection<string> workerIds, TimeSpan timeout, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + timeout;
        var idle = new HashSet<string>();
        while (true)
        {
            try
            {
                using var doc = System.Text.Json.JsonDocument.Parse(await http.GetStringAsync("/workers", ct));
                idle = doc.RootElement.EnumerateArray()
                    .Where(w => w.TryGetProperty("online", out var o) && o.ValueKind == System.Text.Json.JsonValueKind.True &&
                                (!w.TryGetProperty("assignment", out var a) || a.ValueKind == System.Text.Json.JsonValueKind.Null))
                    .Select(w => w.GetProperty("workerId").GetString()!).ToHashSet();
                if (workerIds.All(idle.Contains)) return;
            }
            catch (HttpRequestException) { }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"workers {string.Join(", ", workerIds.Except(idle))} were not online and idle within {timeout.TotalSeconds:F0} s\n{RecentLines(30)}");
            await Task.Delay(200, ct);
        }
    }

    /// <summary>POST /workers/{id}/leave with the cluster token: the coordinator takes the worker out of its job.</summary>
    public async Task LeaveOverRestAsync(string workerId, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, $"/workers/{workerId}/leave");
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", Token);
        using var response = await http.SendAsync(request, ct);
        if (!response.IsSuccessStatusCode)
            throw new InvalidOperationException($"POST /workers/{workerId}/leave answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync(ct)}");
        Options.Log($"asked {workerId} to leave over REST");
    }

    /// <summary>Stops every worker this cluster started (continuing stopped ones first), so the next job starts from none.</summary>
    public async Task StopWorkersAsync()
    {
        foreach (var w in workers.Keys)
        {
            bool wasStopped;
            lock (stopped) wasStopped = stopped.Remove(w);
            if (wasStopped && !App.HasExited(w)) App.Signal(w, Signals.Cont);
        }
        await Task.WhenAll(workers.Keys.Select(w => App.StopInstanceAsync(w, TimeSpan.FromSeconds(15))));
    }

    // ---- Coordinator and storage ----

    /// <summary>SIGKILLs the coordinator and waits until it is gone.</summary>
    public async Task KillCoordinatorAsync(CancellationToken ct)
    {
        Signal(ServiceNames.Coordinator, Signals.Kill);
        await WaitForExitAsync(ServiceNames.Coordinator, TimeSpan.FromSeconds(30), ct);
    }

    /// <summary>Starts the coordinator again on the same ports, token and state folder; returns when it is healthy.</summary>
    public async Task RestartCoordinatorAsync(CancellationToken ct)
    {
        await App.RestartAsync(ServiceNames.Coordinator, ct);
        Options.Log($"coordinator restarted (pid {Pid(ServiceNames.Coordinator)})");
    }

    /// <summary>Stops Azurite (SIGTERM: it saves its metadata and exits) and waits until it is gone.</summary>
    public async Task StopAzuriteAsync(CancellationToken ct)
    {
        Options.Log("stopping Azurite");
        await App.StopInstanceAsync(ServiceNames.Blobs, TimeSpan.FromSeconds(20));
        await WaitForExitAsync(ServiceNames.Blobs, TimeSpan.FromSeconds(5), ct);
    }

    /// <summary>Starts Azurite again on the same port and data folder.</summary>
    public async Task StartAzuriteAsync(CancellationToken ct)
    {
        await App.RestartAsync(ServiceNames.Blobs, ct);
        Options.Log($"Azurite restarted (pid {Pid(ServiceNames.Blobs)})");
    }

    /// <summary>
    /// Restarts every service a previous scenario left dead (in start order, each on its own ports and folders) and stops
    /// the jobs that could not be stopped while the coordinator was down, so a scenario starts on a working cluster and a
    /// failure that killed a service stays the failure of the scenario it happened in. Throws, with the service's last
    /// lines, if a service does not come back.
    /// </summary>
    public async Task EnsureServicesRunningAsync(CancellationToken ct)
    {
        foreach (var service in Services.Where(App.HasExited))
        {
            Options.Log($"{service} is not running before this scenario; restarting it. It was: {await App.DescribeExitAsync(service)}");
            await App.RestartAsync(service, ct);
        }
        foreach (var jobId in unstoppedJobs.Keys) await StopJobAsync(jobId, ct);
    }

    /// <summary>
    /// What a failed scenario's output should show besides its own lines: every service that is not running, with its exit
    /// code and last lines (stdout and stderr), and the cluster's most recent stdout lines.
    /// </summary>
    public async Task<string> DescribeFailureAsync()
    {
        var text = new System.Text.StringBuilder();
        foreach (var service in Services)
            text.AppendLine(App.HasExited(service) ? $"{service} is not running: {await App.DescribeExitAsync(service)}" : $"{service} runs (pid {Pid(service)})");
        return text.Append(RecentLines(40)).ToString();
    }

    /// <summary>Processes of the given instances of this run that are still alive (not counting exited, unreaped children).</summary>
    public List<int> Alive(IEnumerable<string> instances) => instances.SelectMany(i => ProcessScan.OfInstance(i, Options.RunDir)).ToList();

    void KillAllOnExit(object? sender, EventArgs e)
    {
        foreach (var pid in ProcessScan.Mentioning(Options.RunDir))
            try { System.Diagnostics.Process.GetProcessById(pid).Kill(entireProcessTree: true); } catch (ArgumentException) { } catch (InvalidOperationException) { }
        Namespace?.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        AppDomain.CurrentDomain.ProcessExit -= KillAllOnExit;
        // A SIGSTOPped process ignores SIGTERM until continued; continue it so it can leave.
        List<string> frozen;
        lock (stopped) frozen = stopped.ToList();
        foreach (var w in frozen) try { App.Signal(w, Signals.Cont); } catch (InvalidOperationException) { }
        await App.DisposeAsync();
        // Anything that still mentions the run folder (a grandchild the tree kill missed) goes now.
        foreach (var pid in ProcessScan.Mentioning(Options.RunDir))
            try { System.Diagnostics.Process.GetProcessById(pid).Kill(entireProcessTree: true); } catch (ArgumentException) { } catch (InvalidOperationException) { }
        Namespace?.Dispose();
        http.Dispose();
    }

    static string? Which(string command) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Select(d => Path.Combine(d, command)).FirstOrDefault(File.Exists);
}
