// AppHost: the whole system on this machine — blob storage, data service, checkpoint store, coordinator and
// GPU workers — started in dependency order, then the default job. Reads like an Aspire AppHost: one chain per resource.
using System.Reflection;
using System.Security.Cryptography;
using DeepSeekCluster.AppHost;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts;

var meta = typeof(AppHostOptions).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().ToDictionary(a => a.Key, a => a.Value ?? "");
var root = meta["RepositoryRoot"];
if (args.Contains("--help") || args.Contains("-h"))
{
    Console.WriteLine(AppHostOptions.Usage);
    return 0;
}
AppHostOptions options;
try { options = AppHostOptions.Parse(args, root, LocalGpus.Visible()); }
catch (ArgumentException e)
{
    Console.Error.WriteLine($"apphost: {e.Message}");
    Console.Error.WriteLine(AppHostOptions.Usage);
    return 2;
}
Directory.CreateDirectory(options.RunDir);
var token = Convert.ToHexString(RandomNumberGenerator.GetBytes(32)).ToLowerInvariant(); // fresh per run, never printed
var tokenFile = Path.Combine(options.RunDir, "cluster.token");
File.WriteAllText(tokenFile, token);
if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(tokenFile, UnixFileMode.UserRead | UnixFileMode.UserWrite);

var builder = new DistributedApplicationBuilder(root, meta["BuildConfiguration"]);

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
    .WithEnvironment("DataShards__CacheDir", Path.Combine(options.RunDir, "shard-cache"));
var checkpoints = builder.AddProject(ServiceNames.Checkpoints, "CheckpointStore", "CheckpointStore")
    .WithEndpoint("http").WithEndpoint("grpc", http2Only: true).WithHttpHealthCheck()
    .WithEnvironment("Storage__Folder", Path.Combine(options.RunDir, "checkpoints"));
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
var gpus = new GpuSlots(options.Gpus);
if (options.Device == "cuda")
{
    worker.WithInstanceEnvironment(instance => [new("CUDA_VISIBLE_DEVICES", gpus.Take(instance))]);
    Log.AppHost($"workers train on cuda, one GPU each, of {options.Gpus.Count} ({string.Join(", ", options.Gpus)}): the nccl backend");
}

// ---- Run ----
using var stop = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
await using var app = builder.Build();
var endpoints = new EndpointsFile(Path.Combine(options.RunDir, "endpoints.json"));
app.LineReceived += (instance, line) => { if (instance.StartsWith(worker.Name + "-", StringComparison.Ordinal)) endpoints.Observe(instance, worker.Name, line); };
app.ChildExited += (instance, _) => { endpoints.Remove(instance); gpus.Release(instance); };
try
{
    await app.StartAsync(stop.Token);
    foreach (var r in new[] { coordinator, dataShards, checkpoints }) endpoints.Add(r.Name, r); // one instance each, named as the resource
    Log.AppHost($"endpoints of every instance: {endpoints.Path}");
    var job = new DefaultJob(options, coordinator, dataShards, token);
    var modelSaved = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
    app.LineReceived += (_, line) => { if (line.Contains("model saved to")) modelSaved.TrySetResult(line); };
    var datasetId = await job.PrepareCorpusAsync(Path.Combine(root, "data", "corpus", "kjv.txt.gz"), stop.Token);
    var jobId = await job.SubmitAsync(datasetId, stop.Token);
    var console = job.AcceptConsoleCommandsAsync(app, worker, stop);
    var final = await job.FollowAsync(jobId, stop.Token);
    if (final == "Completed")
    {
        // Rank 0 evaluates, samples and writes the model folder after the last step; wait for it before reporting.
        try { await modelSaved.Task.WaitAsync(TimeSpan.FromMinutes(3), stop.Token); }
        catch (TimeoutException) { Log.AppHost("rank 0 did not report its final model within 3 minutes"); }
    }
    Log.AppHost($"job {jobId} ended: {final}");
    Log.AppHost($"REST API: {coordinator.GetEndpoint("http").Url}/jobs   (writes need 'Authorization: Bearer <token>' with the token in {tokenFile})");
    Log.AppHost($"status page: {coordinator.GetEndpoint("http").Url}/status");
    foreach (var i in endpoints.Snapshot().Where(i => i.Endpoints.ContainsKey("http")))
        Log.AppHost($"metrics: {i.Endpoints["http"]}/metrics   ({i.Name})");
    if (options.ExitWhenDone) return final == "Completed" ? 0 : 1;
    Log.AppHost("the cluster stays up; Ctrl+C (or 'quit') stops it");
    await Task.Delay(Timeout.Infinite, stop.Token);
    return 0;
}
catch (OperationCanceledException) when (stop.IsCancellationRequested)
{
    Log.AppHost("stopping");
    return 0;
}
catch (Exception e) when (e is InvalidOperationException or TimeoutException or HttpRequestException or Grpc.Core.RpcException)
{
    Log.AppHost($"failed: {e.Message}");
    return 1;
}

static string? Which(string command) =>
    (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Select(d => Path.Combine(d, command)).FirstOrDefault(File.Exists);
