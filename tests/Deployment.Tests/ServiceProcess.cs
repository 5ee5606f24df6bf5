// A service of the cluster as a real child process (`dotnet <its built assembly>`), configured the way a pod is:
// environment variables only, Kestrel's two named endpoints on free loopback ports, DOTNET_ENVIRONMENT=Production.
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Reflection;

namespace DeepSeekCluster.Deployment.Tests;

public sealed class ServiceProcess : IAsyncDisposable
{
    readonly Process process;
    readonly ConcurrentQueue<string> output = new();

    public int HttpPort { get; }
    public int GrpcPort { get; }
    public HttpClient Http { get; }
    public Uri GrpcAddress => new($"http://127.0.0.1:{GrpcPort}");

    /// <summary>Everything the process wrote to stdout and stderr so far.</summary>
    public string Output => string.Join('\n', output);

    ServiceProcess(Process process, int httpPort, int grpcPort)
    {
        (this.process, HttpPort, GrpcPort) = (process, httpPort, grpcPort);
        Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{httpPort}"), Timeout = TimeSpan.FromSeconds(10) };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) output.Enqueue(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) output.Enqueue(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
    }

    /// <summary>The built assembly of a service this test project builds first (Deployment.Tests.csproj, TorchFreeService items).</summary>
    public static string AssemblyOf(string name) => typeof(ServiceProcess).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .Where(a => a.Key == "TorchFreeService").Select(a => a.Value!)
        .SingleOrDefault(p => Path.GetFileNameWithoutExtension(p) == name)
        ?? throw new InvalidOperationException($"no built assembly named {name} among the TorchFreeService items of Deployment.Tests.csproj");

    /// <summary>The worker's built assembly (gpu-worker.dll).</summary>
    public static string WorkerAssembly => typeof(ServiceProcess).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .SingleOrDefault(a => a.Key == "WorkerAssembly")?.Value ?? throw new InvalidOperationException("no WorkerAssembly item in Deployment.Tests.csproj");

    /// <summary>Starts the service and returns once its readiness endpoint (/health) answers 200.</summary>
    public static async Task<ServiceProcess> StartAsync(string assembly, IReadOnlyDictionary<string, string> environment, int? httpPort = null, int? grpcPort = null)
    {
        var service = Launch(AssemblyOf(assembly), [], environment, httpPort ?? FreePort.Next(), grpcPort ?? FreePort.Next());
        try
        {
            await service.WaitForHealthAsync(ready: true, TimeSpan.FromSeconds(60));
            return service;
        }
        catch
        {
            await service.DisposeAsync();
            throw;
        }
    }

    /// <summary>Starts `dotnet dll args` with Kestrel's endpoints on the given ports, without waiting for anything.</summary>
    public static ServiceProcess Launch(string dll, string[] args, IReadOnlyDictionary<string, string> environment, int httpPort, int grpcPort)
    {
        var info = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = Path.GetDirectoryName(dll)! };
        info.ArgumentList.Add(dll);
        foreach (var a in args) info.ArgumentList.Add(a);
        info.Environment["DOTNET_ENVIRONMENT"] = "Production";
        info.Environment["ASPNETCORE_ENVIRONMENT"] = "Production";
        info.Environment["Kestrel__Endpoints__http__Url"] = $"http://127.0.0.1:{httpPort}";
        info.Environment["Kestrel__Endpoints__http__Protocols"] = "Http1";
        info.Environment["Kestrel__Endpoints__grpc__Url"] = $"http://127.0.0.1:{grpcPort}";
        info.Environment["Kestrel__Endpoints__grpc__Protocols"] = "Http2";
        foreach (var (k, v) in environment) info.Environment[k] = v;
        return new ServiceProcess(Process.Start(info)!, httpPort, grpcPort);
    }

    public bool HasExited => process.HasExited;

    public int ExitCode => process.ExitCode;

    /// <summary>Polls /health, as a readiness probe does, until it answers 200 (ready) or 503 (not ready).</summary>
    public async Task WaitForHealthAsync(bool ready, TimeSpan timeout)
    {
        var until = DateTime.UtcNow + timeout;
        var expected = ready ? System.Net.HttpStatusCode.OK : System.Net.HttpStatusCode.ServiceUnavailable;
        string last = "no answer";
        while (true)
        {
            if (process.HasExited) throw new InvalidOperationException($"{process.StartInfo.ArgumentList[0]} exited with {process.ExitCode} while waiting for /health {(int)expected}:\n{Output}");
            try
            {
                using var response = await Http.GetAsync("/health");
                if (response.StatusCode == expected) return;
                last = $"{(int)response.StatusCode}";
            }
            catch (HttpRequestException e) { last = e.Message; }
            catch (TaskCanceledException) { last = "timeout"; }
            if (DateTime.UtcNow > until) throw new TimeoutException($"/health of {process.StartInfo.ArgumentList[0]} did not answer {(int)expected} within {timeout.TotalSeconds} s (last: {last}):\n{Output}");
            await Task.Delay(100);
        }
    }

    /// <summary>Waits for a line of output containing <paramref name="text"/>.</summary>
    public async Task WaitForOutputAsync(string text, TimeSpan timeout)
    {
        var until = DateTime.UtcNow + timeout;
        while (!Output.Contains(text, StringComparison.Ordinal))
        {
            if (DateTime.UtcNow > until) throw new TimeoutException($"no output line with '{text}' within {timeout.TotalSeconds} s:\n{Output}");
            await Task.Delay(50);
        }
    }

    /// <summary>SIGTERM, as the kubelet sends on pod deletion; returns the exit code.</summary>
    public async Task<int> TerminateAsync(TimeSpan timeout)
    {
        using var kill = Process.Start("kill", ["-TERM", process.Id.ToString()])!;
        await kill.WaitForExitAsync();
        using var cts = new CancellationTokenSource(timeout);
        await process.WaitForExitAsync(cts.Token);
        return process.ExitCode;
    }

    /// <summary>The value of one series of /metrics (exact label set in Prometheus text order), or null when absent.</summary>
    /// <summary>
    /// The counter once it reads <paramref name="expected"/>, or its last reading after 10 s: the Prometheus exporter
    /// caches a scrape's answer for a moment, so calls just made may not show in the first read after them.
    /// </summary>
    public async Task<double?> MetricReachingAsync(double expected, string name, params (string Label, string Value)[] labels)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30); // generous: a loaded CI machine; returns as soon as it matches
        while (true)
        {
            var value = await MetricAsync(name, labels);
            if (value == expected || DateTime.UtcNow > deadline) return value;
            await Task.Delay(100);
        }
    }

    public async Task<double?> MetricAsync(string name, params (string Label, string Value)[] labels)
    {
        string text = await Http.GetStringAsync("/metrics");
        foreach (var line in text.Split('\n'))
        {
            if (!line.StartsWith(name + "{", StringComparison.Ordinal)) continue;
            int close = line.LastIndexOf('}');
            var present = line[(name.Length + 1)..close];
            if (labels.All(l => present.Contains($"{l.Label}=\"{l.Value}\"", StringComparison.Ordinal)))
                return double.Parse(line[(close + 1)..].Trim().Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        }
        return null;
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        if (!process.HasExited)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
        process.Dispose();
    }
}
