// The worker's cluster settings, from the same environment keys an Aspire AppHost or the k8s ConfigMap sets.
using DeepSeekCluster.Contracts;
using DeepSeekCluster.ServiceDefaults;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed record WorkerSettings
{
    public required Uri Coordinator { get; init; }
    public required Uri DataShards { get; init; }
    public required Uri Checkpoints { get; init; }
    public required string Token { get; init; }
    public required string WorkerId { get; init; }
    /// <summary>Cluster__Tls__{CertificatePath,KeyPath,CaPath}: mutual TLS to the Coordinator; null (cleartext) when unset.</summary>
    public ClusterTls? Tls { get; init; }
    /// <summary>Address peers use to reach this worker's collectives (the pod IP in Kubernetes).</summary>
    public string CollectiveHost { get; init; } = "127.0.0.1";
    public int CollectivePort { get; init; }
    /// <summary>
    /// Worker__PipelinePort: where this worker accepts the link from the pipeline stage before it (jobs with pp &gt; 1),
    /// announced beside the collective endpoint at CollectiveHost; 0 (the default) picks a free port at start.
    /// </summary>
    public int PipelinePort { get; init; }
    public string Device { get; init; } = "auto";
    /// <summary>Where rank 0 writes the final Hugging Face folder and where rank files are staged before upload.</summary>
    public string OutputDir { get; init; } = "runs/cluster";
    /// <summary>Worker__HeartbeatInterval: must stay well below the Coordinator's HeartbeatTimeout (default 5 s).</summary>
    public TimeSpan HeartbeatInterval { get; init; } = TimeSpan.FromSeconds(1);
    /// <summary>
    /// Worker__CollectiveTimeout: a collective (rendezvous, all-reduce) without progress for this long fails by itself.
    /// A re-formation does not wait for it: the run aborts a blocked collective when it is cancelled.
    /// </summary>
    public TimeSpan CollectiveTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>The environment variables of the services' gRPC addresses (Aspire's service discovery names).</summary>
    public const string CoordinatorKey = $"services__{ServiceNames.Coordinator}__grpc__0", DataShardsKey = $"services__{ServiceNames.DataShards}__grpc__0",
        CheckpointsKey = $"services__{ServiceNames.Checkpoints}__grpc__0";

    /// <summary>True when the environment names a coordinator: the process was started as part of a cluster.</summary>
    public static bool Configured => Environment.GetEnvironmentVariable(CoordinatorKey) is not null;

    public static WorkerSettings FromEnvironment()
    {
        var problems = new List<string>();
        Uri Service(string name, string key)
        {
            var value = Environment.GetEnvironmentVariable(key);
            if (string.IsNullOrWhiteSpace(value)) { problems.Add($"{key} is not set (the {name} service's gRPC address)"); return new Uri("http://invalid"); }
            if (!Uri.TryCreate(value, UriKind.Absolute, out var uri)) { problems.Add($"{key}='{value}' is not an absolute URI"); return new Uri("http://invalid"); }
            return uri;
        }
        var coordinator = Service(ServiceNames.Coordinator, CoordinatorKey);
        var data = Service(ServiceNames.DataShards, DataShardsKey);
        var checkpoints = Service(ServiceNames.Checkpoints, CheckpointsKey);
        var token = Environment.GetEnvironmentVariable("Cluster__Token");
        if (string.IsNullOrWhiteSpace(token)) problems.Add("Cluster__Token is not set (the cluster token; the AppHost sets it, Kubernetes takes it from a Secret)");
        int port = 0;
        if (Environment.GetEnvironmentVariable("Worker__CollectivePort") is { } p && !int.TryParse(p, out port))
            problems.Add($"Worker__CollectivePort='{p}' is not a port number");
        int pipelinePort = 0;
        if (Environment.GetEnvironmentVariable("Worker__PipelinePort") is { } pq && (!int.TryParse(pq, out pipelinePort) || pipelinePort is < 0 or > 65535))
            problems.Add($"Worker__PipelinePort='{pq}' is not a port number (0 picks a free one)");
        TimeSpan Duration(string key, TimeSpan fallback)
        {
            var value = Environment.GetEnvironmentVariable(key);
            if (string.IsNullOrWhiteSpace(value)) return fallback;
            if (double.TryParse(value, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var seconds) && seconds > 0)
                return TimeSpan.FromSeconds(seconds);
            if (TimeSpan.TryParse(value, System.Globalization.CultureInfo.InvariantCulture, out var span) && span > TimeSpan.Zero) return span;
            problems.Add($"{key}='{value}' is not a positive duration (seconds, such as 2.5, or a TimeSpan such as 00:00:02.5)");
            return fallback;
        }
        ClusterTls? tls = null;
        try
        {
            tls = ClusterTls.Load(Environment.GetEnvironmentVariable("Cluster__Tls__CertificatePath"), Environment.GetEnvironmentVariable("Cluster__Tls__KeyPath"),
                Environment.GetEnvironmentVariable("Cluster__Tls__CaPath"), key => key.Replace(":", "__"));
        }
        catch (ArgumentException e) { problems.Add(e.Message); }
        // A certificate that would silently go unused over cleartext is a mistake, not a choice: all three services serve mutual TLS then.
        foreach (var (address, key) in new[] { (coordinator, CoordinatorKey), (data, DataShardsKey), (checkpoints, CheckpointsKey) })
            if (ClusterChannel.Problem(address, tls, key) is { } problem) problems.Add(problem);
        var heartbeat = Duration("Worker__HeartbeatInterval", TimeSpan.FromSeconds(1));
        var collectiveTimeout = Duration("Worker__CollectiveTimeout", TimeSpan.FromSeconds(30));
        if (problems.Count > 0) throw new ArgumentException("cluster mode: " + string.Join("; ", problems));
        var id = Environment.GetEnvironmentVariable("Worker__Id") ?? Environment.GetEnvironmentVariable("DEEPSEEK_INSTANCE")
                 ?? $"{Environment.MachineName}-{Environment.ProcessId}";
        return new WorkerSettings
        {
            Coordinator = coordinator, DataShards = data, Checkpoints = checkpoints, Token = token!, WorkerId = id, Tls = tls,
            CollectiveHost = Environment.GetEnvironmentVariable("Worker__CollectiveHost") ?? Environment.GetEnvironmentVariable("POD_IP") ?? "127.0.0.1",
            CollectivePort = port, PipelinePort = pipelinePort,
            Device = Environment.GetEnvironmentVariable("Worker__Device") ?? "auto",
            OutputDir = Environment.GetEnvironmentVariable("Worker__OutputDir") ?? Path.Combine("runs", "cluster"),
            HeartbeatInterval = heartbeat, CollectiveTimeout = collectiveTimeout,
        };
    }
}
