// gpu-worker: one process per accelerator. Verbs: join (cluster mode, the default when a coordinator is configured),
// train (standalone, no cluster) and generate (from a HF model folder).
using System.Runtime.InteropServices;
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
        null or "help" or "--help" or "-h" => Usage(0),
        var other => Fail($"unknown verb '{other}'"),
    };
}
catch (Exception e) when (e is ArgumentException or FileNotFoundException or DirectoryNotFoundException or InvalidDataException)
{
    return Fail(e.Message);
}

static async Task<int> Join()
{
    var settings = WorkerSettings.FromEnvironment();
    using var stop = new CancellationTokenSource();
    // SIGTERM (Kubernetes pod deletion, the AppHost removing a worker) and Ctrl+C: leave cleanly.
    using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });
    using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Cancel(); });
    return await new ClusterWorker(settings, Console.Out).RunAsync(stop.Token);
}

static int Fail(string message)
{
    Console.Error.WriteLine($"gpu-worker: {message}");
    Console.Error.WriteLine("Run 'gpu-worker help' for usage.");
    return 2;
}

static int Usage(int code)
{
    Console.WriteLine(StandaloneCommands.Usage);
    return code;
}
