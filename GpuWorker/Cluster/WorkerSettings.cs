// The worker's cluster settings, bound from configuration at start: the Worker section (WorkerOptions, validated), and
// the service addresses, token and certificates every process of the cluster reads. Configuration includes the
// environment, so the variables the AppHost, the k8s manifests and the tests set keep working (Worker__CollectivePort,
// services__coordinator__grpc__0, Cluster__Token, …); a bad value stops the worker at start with a message naming its key.
using System.ComponentModel.DataAnnotations;
using System.Globalization;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>The Worker configuration section (environment: Worker__{Property}).</summary>
public sealed class WorkerOptions : IValidatableObject
{
    public const string Section = "Worker";

    /// <summary>The worker id; unset, DEEPSEEK_INSTANCE (the AppHost's instance, the pod's name), else host-pid.</summary>
    public string? Id { get; set; }
    /// <summary>Address peers use to reach this worker's collectives; unset, POD_IP (Kubernetes), else 127.0.0.1.</summary>
    public string? CollectiveHost { get; set; }
    /// <summary>Where the collectives listen; 0 picks a free port at start.</summary>
    public int CollectivePort { get; set; }
    /// <summary>Where this worker accepts the link from the pipeline stage before it (jobs with pp &gt; 1); 0 picks a free port.</summary>
    public int PipelinePort { get; set; }
    /// <summary>auto (CUDA when present), cpu, cuda or cuda:N.</summary>
    public string Device { get; set; } = "auto";
    /// <summary>Where rank 0 writes the final Hugging Face folder and where rank files are staged before upload.</summary>
    public string OutputDir { get; set; } = Path.Combine("runs", "cluster");
    /// <summary>Seconds (2.5) or a TimeSpan (00:00:02.5); must stay well below the Coordinator's HeartbeatTimeout (5 s). Default 1 s.</summary>
    public string? HeartbeatInterval { get; set; }
    /// <summary>
    /// Seconds or a TimeSpan: a collective (rendezvous, all-reduce) without progress for this long fails by itself. A
    /// re-formation does not wait for it: the run aborts a blocked collective when it is cancelled. Default 30 s.
    /// </summary>
    public string? CollectiveTimeout { get; set; }
    /// <summary>
    /// After the Coordinator asks this worker to leave (POST /workers/{id}/leave), stay up and unready instead of exiting
    /// until SIGTERM. Kubernetes (restartPolicy Always) would start an exited worker again and it would rejoin; the
    /// manifests set it. Default false: a local run's leave ends the process.
    /// </summary>
    public bool StayAfterLeave { get; set; }
    /// <summary>
    /// Bytes one rank of this worker may hold (parameters, gradients, optimizer, activations); a job whose plan is
    /// predicted to need more is refused before it starts. Unset: the GPU's memory on CUDA, the memory available to
    /// this process on CPU.
    /// </summary>
    public long? MemoryBudgetBytes { get; set; }
    /// <summary>Drills and tests only: faults injected into training (FaultInjection: "nan@5,spike@12"). Unset in production.</summary>
    public string? InjectFault { get; set; }

    public TimeSpan Heartbeat => Duration(HeartbeatInterval) ?? TimeSpan.FromSeconds(1);
    public TimeSpan Collective => Duration(CollectiveTimeout) ?? TimeSpan.FromSeconds(30);

    public IEnumerable<ValidationResult> Validate(ValidationContext context)
    {
        if (CollectivePort is < 0 or > 65535)
            yield return new($"{Section}:CollectivePort (Worker__CollectivePort) = {CollectivePort} is not a port number (0 picks a free one)", [nameof(CollectivePort)]);
        if (PipelinePort is < 0 or > 65535)
            yield return new($"{Section}:PipelinePort (Worker__PipelinePort) = {PipelinePort} is not a port number (0 picks a free one)", [nameof(PipelinePort)]);
        foreach (var (name, value) in new[] { (nameof(HeartbeatInterval), HeartbeatInterval), (nameof(CollectiveTimeout), CollectiveTimeout) })
            if (!string.IsNullOrWhiteSpace(value) && Duration(value) is null)
                yield return new($"{Section}:{name} (Worker__{name}) = '{value}' is not a positive duration (seconds, such as 2.5, or a TimeSpan such as 00:00:02.5)", [name]);
        if (MemoryBudgetBytes is <= 0)
            yield return new($"{Section}:MemoryBudgetBytes (Worker__MemoryBudgetBytes) = {MemoryBudgetBytes} must be a positive number of bytes (unset: the device's memory)", [nameof(MemoryBudgetBytes)]);
        if (string.IsNullOrWhiteSpace(Device)) yield return new($"{Section}:Device (Worker__Device) is empty: auto, cpu, cuda or cuda:N", [nameof(Device)]);
        string? faultProblem = null;
        try { FaultInjection.Parse(InjectFault, $"{Section}:{nameof(InjectFault)} (Worker__InjectFault)"); }
        catch (ArgumentException e) { faultProblem = e.Message; }
        if (faultProblem is not null) yield return new(faultProblem, [nameof(InjectFault)]);
        if (string.IsNullOrWhiteSpace(OutputDir)) yield return new($"{Section}:OutputDir (Worker__OutputDir) is empty: a folder for rank files and the model", [nameof(OutputDir)]);
    }

    static TimeSpan? Duration(string? value)
    {
        if (string.IsNullOrWhiteSpace(value)) return null;
        if (double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var seconds))
            return seconds > 0 && double.IsFinite(seconds) ? TimeSpan.FromSeconds(seconds) : null;
        return TimeSpan.TryParse(value, CultureInfo.InvariantCulture, out var span) && span > TimeSpan.Zero ? span : null;
    }
}

/// <summary>Everything a worker process needs to take part in a cluster, resolved and checked.</summary>
public sealed record WorkerSettings
{
    public required Uri Coordinator { get; init; }
    public required Uri DataShards { get; init; }
    public required Uri Checkpoints { get; init; }
    public required string Token { get; init; }
    public required string WorkerId { get; init; }
    /// <summary>Cluster:Tls:{CertificatePath,KeyPath,CaPath}: mutual TLS to the Coordinator; null (cleartext) when unset.</summary>
    public ClusterTls? Tls { get; init; }
    public string CollectiveHost { get; init; } = "127.0.0.1";
    public int CollectivePort { get; init; }
    public int PipelinePort { get; init; }
    public string Device { get; init; } = "auto";
    public string OutputDir { get; init; } = "runs/cluster";
    public TimeSpan HeartbeatInterval { get; init; } = TimeSpan.FromSeconds(1);
    public TimeSpan CollectiveTimeout { get; init; } = TimeSpan.FromSeconds(30);
    public bool StayAfterLeave { get; init; }
    /// <summary>The configured bytes per rank (Worker:MemoryBudgetBytes), or null: the device's memory.</summary>
    public long? MemoryBudgetBytes { get; init; }

    /// <summary>The bytes a rank on <paramref name="device"/> may hold, and where that number came from (for the refusal's message).</summary>
    public (long Bytes, string Source) MemoryBudget(TorchSharp.torch.Device device)
    {
        if (MemoryBudgetBytes is { } set) return (set, "Worker:MemoryBudgetBytes");
        if (device.type == TorchSharp.DeviceType.CUDA && DeepSeekCluster.Training.Perf.CudaDevice.TotalMemory(device) is { } gpu) return (gpu, $"{device}'s memory");
        return (GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, "the memory available to this worker process");
    }
    public FaultInjection Faults { get; init; } = FaultInjection.None;

    /// <summary>The configuration keys of the services' gRPC addresses (Aspire's service discovery names).</summary>
    public const string CoordinatorKey = $"services:{ServiceNames.Coordinator}:grpc:0";
    public const string DataShardsKey = $"services:{ServiceNames.DataShards}:grpc:0";
    public const string CheckpointsKey = $"services:{ServiceNames.Checkpoints}:grpc:0";
    public const string TokenKey = "Cluster:Token";

    /// <summary>True when the environment names a coordinator: the process was started as part of a cluster.</summary>
    public static bool Configured => Environment.GetEnvironmentVariable(CoordinatorKey.Replace(":", "__")) is not null;

    /// <summary>The settings of <paramref name="worker"/> and <paramref name="configuration"/>; every problem, each naming its key, in one ArgumentException.</summary>
    public static WorkerSettings From(WorkerOptions worker, IConfiguration configuration)
    {
        var problems = new List<string>();
        Uri Service(string? value, string key, string name)
        {
            var variable = key.Replace(":", "__");
            if (string.IsNullOrWhiteSpace(value)) { problems.Add($"{variable} is not set (the {name} service's gRPC address)"); return new Uri("http://invalid"); }
            if (!Uri.TryCreate(value, UriKind.Absolute, out var uri)) { problems.Add($"{variable}='{value}' is not an absolute URI"); return new Uri("http://invalid"); }
            return uri;
        }
        var coordinator = Service(configuration[CoordinatorKey], CoordinatorKey, ServiceNames.Coordinator);
        var data = Service(configuration[DataShardsKey], DataShardsKey, ServiceNames.DataShards);
        var checkpoints = Service(configuration[CheckpointsKey], CheckpointsKey, ServiceNames.Checkpoints);
        var token = configuration[TokenKey];
        if (string.IsNullOrWhiteSpace(token)) problems.Add("Cluster__Token is not set (the cluster token; the AppHost sets it, Kubernetes takes it from a Secret)");
        ClusterTls? tls = null;
        try
        {
            tls = ClusterTls.Load(configuration[ClusterTls.CertificatePathKey], configuration[ClusterTls.KeyPathKey], configuration[ClusterTls.CaPathKey],
                key => key.Replace(":", "__"));
        }
        catch (ArgumentException e) { problems.Add(e.Message); }
        // A certificate that would silently go unused over cleartext is a mistake, not a choice: all three services serve mutual TLS then.
        foreach (var (address, key) in new[] { (coordinator, CoordinatorKey), (data, DataShardsKey), (checkpoints, CheckpointsKey) })
            if (ClusterChannel.Problem(address, tls, key.Replace(":", "__")) is { } problem) problems.Add(problem);
        if (problems.Count > 0) throw new ArgumentException("cluster mode: " + string.Join("; ", problems));
        return new WorkerSettings
        {
            Coordinator = coordinator, DataShards = data, Checkpoints = checkpoints, Token = token!, Tls = tls,
            WorkerId = worker.Id ?? Environment.GetEnvironmentVariable("DEEPSEEK_INSTANCE") ?? $"{Environment.MachineName}-{Environment.ProcessId}",
            CollectiveHost = worker.CollectiveHost ?? Environment.GetEnvironmentVariable("POD_IP") ?? "127.0.0.1",
            CollectivePort = worker.CollectivePort, PipelinePort = worker.PipelinePort, Device = worker.Device, OutputDir = worker.OutputDir,
            HeartbeatInterval = worker.Heartbeat, CollectiveTimeout = worker.Collective, StayAfterLeave = worker.StayAfterLeave,
            MemoryBudgetBytes = worker.MemoryBudgetBytes, Faults = FaultInjection.Parse(worker.InjectFault, "Worker__InjectFault"),
        };
    }
}

public static class WorkerSettingsExtensions
{
    /// <summary>
    /// Binds the Worker section with validation at start, and resolves <see cref="WorkerSettings"/> from it; the host's
    /// StartAsync fails on the first bad value, naming its key.
    /// </summary>
    public static IHostApplicationBuilder AddWorkerSettings(this IHostApplicationBuilder builder)
    {
        builder.Services.AddOptions<WorkerOptions>().BindConfiguration(WorkerOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        builder.Services.AddSingleton(sp => WorkerSettings.From(sp.GetRequiredService<IOptions<WorkerOptions>>().Value, sp.GetRequiredService<IConfiguration>()));
        return builder;
    }
}
