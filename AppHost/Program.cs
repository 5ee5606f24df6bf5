// AppHost: the whole system on this machine — blob storage, data service, checkpoint store, coordinator and
// GPU workers — started in dependency order, then the default job. Reads like an Aspire AppHost: one chain per resource.
using System.Reflection;
using DeepSeekCluster.AppHost;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts;

// ---- Options ----
var meta = typeof(AppHostOptions).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().ToDictionary(a => a.Key, a => a.Value ?? "");
var root = meta["RepositoryRoot"];
if (AppHostOptions.FromCommandLine(args, root, out int exitCode) is not { } options) return exitCode;
if (options.IdleWorkers is { } idle) Log.AppHost(idle);
var token = LocalRun.NewToken(options.RunDir);
var builder = new DistributedApplicationBuilder(root, meta["ServicesConfiguration"]);

// ---- Resources ----
Resource? blobs = null;
string? blobConnection = null;
if (!options.NoAzurite && Which("azurite-blob") is { } azurite)
{
    int port = FreePort.Next();
    blobs = builder.AddExecutable(ServiceNames.Blobs, azurite, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--blobHost", "127.0.0.1",
        "--blobPort", port.ToString(), "--location", Path.Combine(options.RunDir, "azurite"));
    blobs.ReadinessPort = port;
    // Azurite's published development account (not a secret).
    blobConnection = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;" +
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;" +
        $"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;";
}

var dataShards = builder.AddProject(ServiceNames.DataShards, "DataShardService", "DeepSeekCluster.DataShardService")
    .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
    .WithEnvironment("DataShards__Root", Path.Combine(options.RunDir, "datasets"))
    .WithEnvironment("DataShards__WorkDir", Path.Combine(options.RunDir, "prepare"))
    .WithEnvironment("DataShards__CacheDir", Path.Combine(options.RunDir, "shard-cache"))
    .WithEnvironment("Cluster__Token", token);
var checkpoints = builder.AddProject(ServiceNames.Checkpoints, "CheckpointStore", "CheckpointStore")
    .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
    .WithEnvironment("Storage__Folder", Path.Combine(options.RunDir, "checkpoints"))
    .WithEnvironment("Cluster__Token", token);
if (blobs is not null)
{
    dataShards.WithConnectionString(ServiceNames.Blobs, blobConnection!).WaitFor(blobs);
    checkpoints.WithConnectionString(ServiceNames.Blobs, blobConnection!).WaitFor(blobs);
}
var coordinator = builder.AddProject(ServiceNames.Coordinator, "Coordinator", "DeepSeekCluster.Coordinator")
    .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
    .WithReference(checkpoints).WaitFor(checkpoints)
    .WithEnvironment("Cluster__Token", token)
    .WithEnvironment("Coordinator__StateFolder", Path.Combine(options.RunDir, "coordinator"))
    .WithEnvironment("Orleans__SiloPort", FreePort.Next().ToString())
    .WithEnvironment("Orleans__GatewayPort", FreePort.Next().ToString());
var worker = builder.AddProject(ServiceNames.GpuWorker, "GpuWorker", "gpu-worker")
    .WithArgs("join")
    .WithReference(coordinator).WithReference(dataShards).WithReference(checkpoints)
    .WaitFor(coordinator).WaitFor(dataShards)
    .WithEnvironment("Cluster__Token", token)
    .WithEnvironment("Worker__OutputDir", Path.Combine(options.RunDir, "workers"))
    .WithEnvironment("Kestrel__Endpoints__http__Url", "http://127.0.0.1:0") // each replica's /metrics on a port of its own
    .WithEnvironment("Worker__Device", options.Device)
    .WithReplicas(options.Workers);
if (options.MemoryBudget > 0) worker.WithEnvironment("Worker__MemoryBudgetBytes", options.MemoryBudget.ToString(System.Globalization.CultureInfo.InvariantCulture));
var gpus = new GpuSlots(options.Gpus);
if (options.Device == "cuda")
{
    worker.WithInstanceEnvironment(instance => [new("CUDA_VISIBLE_DEVICES", gpus.Take(instance))]);
    Log.AppHost($"workers train on cuda, one GPU each, of {options.Gpus.Count} ({string.Join(", ", options.Gpus)}): the nccl backend");
}
// Not started with the others (0 replicas): LocalRun starts it once the default job has put its model into the store, on that place.
var modelServer = builder.AddProject("model-server", "ModelServer", "model-server")
    .WithEndpoint("http").WithHttpHealthCheck()
    .WithEnvironment("Cluster__Token", token)
    .WithEnvironment("Serving__Models__0__Version", "default")
    .WithEnvironment("Serving__Device", options.Device == "cuda" ? "cuda" : "cpu")
    .WithReplicas(0);

// ---- Run ----
return await LocalRun.RunAsync(builder, new LocalCluster(coordinator, dataShards, checkpoints, worker, gpus, modelServer), options, token);

static string? Which(string command) =>
    (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Select(d => Path.Combine(d, command)).FirstOrDefault(File.Exists);
