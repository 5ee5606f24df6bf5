// AppHost: starts the system on this machine. Today that is one gpu-worker training the tiny preset standalone
// on the shipped corpus; the cluster services join it as their issues land. Ctrl+C stops every child.
using System.Reflection;
using DeepSeekCluster.AppHost;

var meta = typeof(ChildProcess).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().ToDictionary(a => a.Key, a => a.Value ?? "");
var root = meta["RepositoryRoot"];
var worker = Path.Combine(root, "GpuWorker", "bin", meta["BuildConfiguration"], "net10.0", "gpu-worker.dll");
if (!File.Exists(worker))
{
    Console.Error.WriteLine($"apphost: {worker} is missing; build the solution first (dotnet build).");
    return 1;
}

// Extra arguments go to the trainer (e.g. --steps 100, --preset small); the run folder is fixed unless given.
var trainArgs = new List<string> { worker, "train" };
if (!args.Contains("--out")) trainArgs.AddRange(["--out", Path.Combine(root, "runs", "apphost")]);
trainArgs.AddRange(args);

using var stop = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
AppDomain.CurrentDomain.ProcessExit += (_, _) => stop.Cancel();

Console.WriteLine($"apphost: starting gpu-worker-0 (standalone training) in {root}");
using var child = new ChildProcess("gpu-worker-0", "dotnet", trainArgs, new Dictionary<string, string>
{
    ["OTEL_SERVICE_NAME"] = "gpu-worker",
    ["DOTNET_ENVIRONMENT"] = "Development",
}, root);
try
{
    int code = await child.WaitAsync(stop.Token);
    Console.WriteLine(code == 0 ? "apphost: gpu-worker-0 finished" : $"apphost: gpu-worker-0 exited with code {code}");
    return code;
}
catch (OperationCanceledException)
{
    Console.WriteLine("apphost: stopping gpu-worker-0");
    child.Stop();
    return 130;
}
