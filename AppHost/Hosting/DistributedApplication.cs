// Starts resources in dependency order, gates dependants on health, prefixes logs, keeps each child's last lines for
// the message of a failure, and stops everything on exit.
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using DeepSeekCluster.Contracts;

namespace DeepSeekCluster.AppHost.Hosting;

public sealed class DistributedApplicationBuilder(string repositoryRoot, string configuration)
{
    public List<Resource> Resources { get; } = new();
    public string RepositoryRoot { get; } = repositoryRoot;
    /// <summary>The build configuration (Debug, Release) whose output <see cref="AddProject"/> runs.</summary>
    public string Configuration { get; } = configuration;

    /// <summary>A .NET project of this repository, run from its build output (the AppHost builds it first).</summary>
    public Resource AddProject(string name, string projectFolder, string assemblyName)
    {
        var dll = Path.Combine(RepositoryRoot, projectFolder, "bin", Configuration, "net10.0", assemblyName + ".dll");
        var r = new Resource { Name = name, Command = "dotnet", IsProject = true };
        r.Args.Add(dll);
        r.Environment["OTEL_SERVICE_NAME"] = name;
        r.Environment["DOTNET_ENVIRONMENT"] = "Development";
        r.Environment["ASPNETCORE_ENVIRONMENT"] = "Development";
        // Request-by-request logs drown the progress a person follows; warnings and errors still show.
        r.Environment["Logging__LogLevel__Microsoft.AspNetCore"] = "Warning";
        r.Environment["Logging__LogLevel__Microsoft.Hosting.Lifetime"] = "Warning";
        Resources.Add(r);
        return r;
    }

    public Resource AddExecutable(string name, string command, params string[] args)
    {
        var r = new Resource { Name = name, Command = command };
        r.Args.AddRange(args);
        Resources.Add(r);
        return r;
    }

    public DistributedApplication Build() => new(Resources, RepositoryRoot);
}

public sealed class DistributedApplication(IReadOnlyList<Resource> resources, string workingDirectory) : IAsyncDisposable
{
    readonly List<(Resource resource, string instance, Process process)> running = new();
    readonly Lock gate = new();
    readonly Dictionary<string, int> indexOf = new();
    readonly ConcurrentDictionary<string, OutputTail> tails = new(); // by instance: its latest process's lines
    readonly ConditionalWeakTable<Process, Task> outputEnded = new(); // completes once both of its streams reached their end
    /// <summary>Lines kept per instance: enough for a start-up failure and the exception that ended it.</summary>
    const int TailCapacity = 200;
    /// <summary>How many of an instance's last lines a failure message quotes.</summary>
    public const int QuotedLines = 60;
    static readonly HttpClient http = new() { Timeout = TimeSpan.FromSeconds(2) };
    public bool Stopping { get; private set; }

    /// <summary>Raised when a child exits while the application is not stopping: (instance, exit code).</summary>
    public event Action<string, int>? ChildExited;

    /// <summary>Raised for every line a child writes to stdout: (instance, line). Stderr lines go to <see cref="LastLines"/> only.</summary>
    public event Action<string, string>? LineReceived;

    public async Task StartAsync(CancellationToken ct)
    {
        var started = new HashSet<Resource>();
        foreach (var r in resources)
        {
            foreach (var dep in r.WaitsFor)
                if (!started.Contains(dep)) throw new InvalidOperationException($"'{r.Name}' waits for '{dep.Name}', which must be added before it");
            if (r.Replicas > 1 && r.Endpoints.Count > 0)
                throw new InvalidOperationException($"'{r.Name}' has endpoints and {r.Replicas} replicas: their ports would collide");
            for (int i = 0; i < r.Replicas; i++) Start(r, i);
            started.Add(r);
            if (r.Replicas > 0) await WaitReadyAsync(r, ct);
        }
    }

    public string Start(Resource r, int index)
    {
        var instance = r.Numbered || r.Replicas > 1 ? $"{r.Name}-{index}" : r.Name;
        var psi = new ProcessStartInfo(r.Command)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = false,
            UseShellExecute = false, WorkingDirectory = workingDirectory,
        };
        foreach (var a in r.Args) psi.ArgumentList.Add(a);
        if (r.IsProject)
            foreach (var e in r.Endpoints)
            {
                psi.Environment[$"Kestrel__Endpoints__{e.Name}__Url"] = e.Url;
                psi.Environment[$"Kestrel__Endpoints__{e.Name}__Protocols"] = e.Http2Only ? "Http2" : "Http1";
            }
        // The resource's own environment last, so it may override an endpoint's binding (e.g. all interfaces).
        foreach (var (k, v) in r.Environment) psi.Environment[k] = v;
        foreach (var (k, v) in r.InstanceEnvironment?.Invoke(instance) ?? []) psi.Environment[k] = v;
        psi.Environment["DEEPSEEK_INSTANCE"] = instance;
        var p = new Process { StartInfo = psi, EnableRaisingEvents = true };
        var tail = tails[instance] = new OutputTail(TailCapacity);
        // A null line is a stream's end: the dying words of a process (an unhandled exception's text) are in once both came.
        var stdoutEnded = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var stderrEnded = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        outputEnded.AddOrUpdate(p, Task.WhenAll(stdoutEnded.Task, stderrEnded.Task));
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null) { stdoutEnded.TrySetResult(); return; }
            tail.Add(e.Data, error: false);
            Log.Child(instance, e.Data, error: false);
            LineReceived?.Invoke(instance, e.Data);
        };
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is null) { stderrEnded.TrySetResult(); return; }
            tail.Add(e.Data, error: true);
            Log.Child(instance, e.Data, error: true);
        };
        p.Exited += (_, _) =>
        {
            if (Stopping) return;
            int code = SafeExitCode(p);
            Log.AppHost(code == 0 ? $"{instance} finished" : $"{instance} exited unexpectedly with code {code}");
            ChildExited?.Invoke(instance, code);
        };
        try { p.Start(); }
        catch (System.ComponentModel.Win32Exception e) { throw new InvalidOperationException($"cannot start '{instance}' ({r.Command}): {e.Message}", e); }
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        lock (gate) { running.Add((r, instance, p)); indexOf[instance] = index; }
        Log.AppHost($"started {instance} (pid {p.Id}){(r.Endpoints.Count > 0 ? " on " + string.Join(", ", r.Endpoints.Select(e => e.Url)) : "")}");
        return instance;
    }

    static int SafeExitCode(Process p) { try { return p.ExitCode; } catch (InvalidOperationException) { return -1; } }

    /// <summary>Polls the resource's health endpoint (or readiness port) until it answers; fails if an instance exits first.</summary>
    public async Task WaitReadyAsync(Resource r, CancellationToken ct)
    {
        if (r.HealthPath is null && r.ReadinessPort is null) return;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(180);
        (string Instance, Process Process)[] processes;
        lock (gate) processes = running.Where(x => x.resource == r).Select(x => (x.instance, x.process)).ToArray();
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            if (processes.FirstOrDefault(x => x.Process.HasExited) is { Process: not null } exited)
                throw new InvalidOperationException($"'{r.Name}' exited before it became ready: {await DescribeExitAsync(exited.Instance, exited.Process)}");
            if (await IsReadyAsync(r, ct)) { Log.AppHost($"{r.Name} is ready"); return; }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"'{r.Name}' did not become ready within 180 s; " +
                                           string.Join("\n", processes.Select(x => $"{x.Instance} (pid {x.Process.Id}) {Quote(x.Instance)}")));
            await Task.Delay(200, ct);
        }
    }

    /// <summary>The last lines an instance's latest process wrote to one stream; empty if it never started.</summary>
    public IReadOnlyList<string> LastLines(string instance, bool stderr, int n = QuotedLines) =>
        tails.TryGetValue(instance, out var tail) ? tail.Last(n, stderr) : [];

    /// <summary>
    /// The latest process of an exited instance in words: pid, exit code and what it means, and its last lines (waiting,
    /// bounded, for its output to end first, so an unhandled exception's text is among them).
    /// </summary>
    public Task<string> DescribeExitAsync(string instance)
    {
        Process? p;
        lock (gate) p = running.LastOrDefault(x => x.instance == instance).process;
        return p is null ? Task.FromResult($"'{instance}' was never started") : DescribeExitAsync(instance, p);
    }

    async Task<string> DescribeExitAsync(string instance, Process p)
    {
        // Bounded: a grandchild that inherited the pipes keeps them open; what arrived by then is what there is.
        if (outputEnded.TryGetValue(p, out var ended)) await Task.WhenAny(ended, Task.Delay(TimeSpan.FromSeconds(5)));
        int code = SafeExitCode(p);
        string meaning = OutputTail.ExitMeaning(code);
        return $"{instance} (pid {p.Id}) exited with code {code}{(meaning.Length > 0 ? $" ({meaning})" : "")}; {Quote(instance)}";
    }

    string Quote(string instance)
    {
        string Section(bool stderr)
        {
            var last = LastLines(instance, stderr);
            string name = stderr ? "stderr" : "stdout";
            return last.Count == 0 ? $"nothing on {name}" : $"its last {last.Count} lines on {name}:\n" + string.Join("\n", last.Select(l => $"  [{instance}] {l}"));
        }
        return Section(stderr: true) + "\n" + Section(stderr: false);
    }

    static async Task<bool> IsReadyAsync(Resource r, CancellationToken ct)
    {
        try
        {
            if (r.ReadinessPort is int port)
            {
                using var c = new System.Net.Sockets.TcpClient();
                await c.ConnectAsync(System.Net.IPAddress.Loopback, port, ct);
                return true;
            }
            var http1 = r.Endpoints.First(e => !e.Http2Only);
            using var resp = await http.GetAsync(http1.Url + r.HealthPath, ct);
            return resp.IsSuccessStatusCode;
        }
        catch (Exception e) when (e is HttpRequestException or System.Net.Sockets.SocketException or TaskCanceledException && !ct.IsCancellationRequested)
        {
            return false;
        }
    }

    public IReadOnlyList<string> Instances(Resource r) { lock (gate) return running.Where(x => x.resource == r && !x.process.HasExited).Select(x => x.instance).ToList(); }

    /// <summary>Asks one instance to leave (SIGTERM), then kills it if it has not exited within the grace period.</summary>
    public async Task StopInstanceAsync(string instance, TimeSpan grace)
    {
        Process? p;
        lock (gate) p = running.FirstOrDefault(x => x.instance == instance).process;
        if (p is null || p.HasExited) return;
        Terminate(p);
        using var cts = new CancellationTokenSource(grace);
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException) { Kill(p); }
    }

    /// <summary>The process id of an instance (its latest start), or null when it never started.</summary>
    public int? Pid(string instance)
    {
        lock (gate) return running.LastOrDefault(x => x.instance == instance).process?.Id;
    }

    /// <summary>Whether the instance's latest process has exited.</summary>
    public bool HasExited(string instance)
    {
        lock (gate) return running.LastOrDefault(x => x.instance == instance).process is not { } p || p.HasExited;
    }

    /// <summary>Sends a POSIX signal (9 KILL, 15 TERM, 19 STOP, 18 CONT on Linux) to an instance's process.</summary>
    public void Signal(string instance, int signal)
    {
        Process? p;
        lock (gate) p = running.LastOrDefault(x => x.instance == instance).process;
        if (p is null) throw new InvalidOperationException($"no instance '{instance}' was started");
        if (!p.HasExited && kill(p.Id, signal) != 0)
            throw new InvalidOperationException($"kill({p.Id}, {signal}) for '{instance}' failed: errno {Marshal.GetLastPInvokeError()}");
    }

    /// <summary>
    /// Starts an exited instance again from its resource, so with the same ports, environment and folders, and waits
    /// until it is ready. Fails if the instance is still running (signal or stop it first).
    /// </summary>
    public async Task RestartAsync(string instance, CancellationToken ct)
    {
        (Resource resource, string instance, Process process) entry;
        int index;
        lock (gate)
        {
            entry = running.LastOrDefault(x => x.instance == instance);
            if (entry.process is null) throw new InvalidOperationException($"no instance '{instance}' was started");
            if (!entry.process.HasExited) throw new InvalidOperationException($"'{instance}' is still running (pid {entry.process.Id})");
            running.Remove(entry);
            index = indexOf[instance];
        }
        entry.process.Dispose();
        Start(entry.resource, index);
        await WaitReadyAsync(entry.resource, ct);
    }

    [DllImport("libc", SetLastError = true)]
    static extern int kill(int pid, int sig);

    static void Terminate(Process p)
    {
        try { if (!p.HasExited) kill(p.Id, 15); } catch (InvalidOperationException) { }
    }

    static void Kill(Process p)
    {
        try { if (!p.HasExited) p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
        p.WaitForExit(5000);
    }

    /// <summary>Stops every child, dependants first: SIGTERM, up to 10 s to leave cleanly, then SIGKILL of the tree.</summary>
    public async ValueTask DisposeAsync()
    {
        Stopping = true;
        List<(Resource, string, Process)> all;
        lock (gate) all = running.ToList();
        all.Reverse();
        foreach (var (_, _, p) in all) Terminate(p);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        foreach (var (_, instance, p) in all)
        {
            var left = deadline - DateTime.UtcNow;
            using var cts = new CancellationTokenSource(left > TimeSpan.Zero ? left : TimeSpan.FromMilliseconds(1));
            try { await p.WaitForExitAsync(cts.Token); }
            catch (OperationCanceledException) { Log.AppHost($"{instance} did not stop in time; killing it"); }
            Kill(p);
            p.Dispose();
        }
    }
}

public static class Log
{
    static readonly bool color = !Console.IsOutputRedirected && Environment.GetEnvironmentVariable("NO_COLOR") is null;
    static readonly string[] palette = ["\u001b[36m", "\u001b[35m", "\u001b[33m", "\u001b[32m", "\u001b[34m", "\u001b[91m", "\u001b[96m"];
    static readonly Lock gate = new();
    static string? status;

    public static void AppHost(string message) => Write("apphost", message, false);

    /// <summary>A live line kept below the log on a terminal (null removes it); callers decide whether output is live.</summary>
    public static void Status(string? line)
    {
        lock (gate)
        {
            Console.Out.Write("\r\u001b[2K" + (line ?? ""));
            status = line;
        }
    }

    public static void Child(string instance, string line, bool error) => Write(instance, line, error);

    static void Write(string name, string message, bool error)
    {
        lock (gate)
        {
            var prefix = color ? $"{palette[(uint)name.GetHashCode() % palette.Length]}[{name}]\u001b[0m " : $"[{name}] ";
            if (status is not null) Console.Out.Write("\r\u001b[2K"); // the log line takes the status line's place ...
            (error ? Console.Error : Console.Out).WriteLine(prefix + message);
            if (status is not null) Console.Out.Write(status); // ... which is redrawn below it
        }
    }
}
