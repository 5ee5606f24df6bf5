// gpu-worker: one process per accelerator. Verbs: join (cluster mode, the default when a coordinator is configured),
// train (standalone, no cluster), generate (from a HF model folder), export (a checkpoint or folder to HF / GGUF / ONNX),
// eval and make-tasks (evaluation tasks) and check (what this machine offers a worker).
using System.Runtime.InteropServices;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;
using DeepSeekCluster.GpuWorker;
using DeepSeekCluster.GpuWorker.Cluster;

try
{
    return args.FirstOrDefault() switch
    {
        "join" => await Join(),
        null when WorkerSettings.Configured => await Join(),
        "train" => StandaloneCommands.Train(args[1..]),
        "generate" => StandaloneCommands.Generate(args[1..]),
        "export" => StandaloneCommands.Export(args[1..]),
        "eval" => EvalCommands.Eval(args[1..]),
        "make-tasks" => EvalCommands.MakeTasks(args[1..]),
        "check" => MachineCheck.Run(args[1..]),
        null or "help" or "--help" or "-h" => Usage(0),
        var other => Fail($"unknown verb '{other}'"),
    };
}
catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or NotSupportedException)
{
    return Fail(e.Message);
}

static async Task<int> Join()
{
    // /health, /alive and /metrics when an http endpoint is configured (Kestrel__Endpoints__http__Url: the AppHost
    // and the Kubernetes ConfigMap set it); /alive answers from this process alone, whatever the training does.
    WebApplication? web = null;
    IHost host;
    WorkerReadiness? readiness = null;
    if (Environment.GetEnvironmentVariable("Kestrel__Endpoints__http__Url") is not null)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.AddBasicServiceDefaults();
        // Readiness (/health) waits for the Coordinator to register this worker; liveness (/alive) stays "self" only.
        builder.Services.AddHealthChecks().AddCheck(WorkerReadiness.Name, readiness = new WorkerReadiness());
        builder.AddWorkerSettings();
        host = web = builder.Build();
        web.MapDefaultEndpoints();
    }
    else
    {
        var builder = Host.CreateApplicationBuilder();
        builder.AddWorkerSettings();
        host = builder.Build();
    }
    using var _ = host;
    WorkerSettings settings;
    try
    {
        await host.StartAsync(); // validates the Worker section first
        settings = host.Services.GetRequiredService<WorkerSettings>();
    }
    catch (OptionsValidationException e) { throw new ArgumentException("cluster mode: " + string.Join("; ", e.Failures)); }
    catch (InvalidOperationException e) when (e.Message.StartsWith("Failed to convert configuration value", StringComparison.Ordinal))
    {
        throw new ArgumentException($"cluster mode: {e.Message}");
    }
    if (web is not null) Console.WriteLine($"health and metrics on {string.Join(", ", web.Urls)} (/health, /alive, /metrics)");
    using var stop = new CancellationTokenSource();
    using var metrics = new TrainingMetrics();
    // SIGTERM (Kubernetes pod deletion, the AppHost removing a worker) and Ctrl+C: leave cleanly.
    using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });
    using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Cancel(); });
    // The Coordinator lists this URL in GET /workers: how the AppHost and scrapers find each worker's /metrics.
    var metricsEndpoint = web?.Urls.FirstOrDefault()?.TrimEnd('/') ?? "";
    try { return await new ClusterWorker(settings, Console.Out, metrics, metricsEndpoint, readiness).RunAsync(stop.Token); }
    finally { await host.StopAsync(); }
}

static int Fail(string message)
{
    Console.Error.WriteLine($"gpu-worker: {message}");
    Console.Error.WriteLine("Run 'gpu-worker help' for usage.");
    return 2;
}

static int Usage(int code)
{
    Console.WriteLine(StandaloneCommands.Usage + Environment.NewLine + EvalCommands.Usage + Environment.NewLine + MachineCheck.Usage);
    return code;
}
