// Real Azurite (npm `azurite`) as a child process on a free port, in memory or in a folder; stoppable and restartable in place, killed on dispose.
using System.Diagnostics;
using System.Text;

namespace DeepSeekCluster.Tests.Shared;

public sealed class AzuriteServer : IAsyncDisposable
{
    // Azurite's well-known development account.
    private const string Account = "devstoreaccount1";
    private const string Key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    private readonly string _executable;
    private readonly string? _dataFolder;
    private readonly StringBuilder _output = new();
    private Process? _process;

    private AzuriteServer(string executable, int port, string? dataFolder)
    {
        _executable = executable;
        Port = port;
        _dataFolder = dataFolder;
    }

    public int Port { get; }

    /// <summary>The blob endpoint, as the Azure SDK names it in errors and the store in its messages.</summary>
    public string BlobEndpoint => $"http://127.0.0.1:{Port}/{Account}";

    public bool Running => _process is { HasExited: false };

    /// <summary>An explicit connection string for Azurite listening on <paramref name="port"/> (the server's own or a proxy's).</summary>
    public static string ConnectionString(int port) =>
        $"DefaultEndpointsProtocol=http;AccountName={Account};AccountKey={Key};BlobEndpoint=http://127.0.0.1:{port}/{Account};";

    /// <summary>
    /// In memory by default. With <paramref name="dataFolder"/> Azurite keeps its blobs and metadata there, so
    /// <see cref="StopAsync"/> and <see cref="StartAgainAsync"/> give a restart that keeps what was stored.
    /// </summary>
    public static async Task<AzuriteServer> StartAsync(string? dataFolder = null)
    {
        string executable = FindOnPath("azurite-blob") ?? throw new InvalidOperationException(
            "azurite-blob is not on PATH. These tests run against real Azurite: install it with `npm install -g azurite` (Node.js 18+).");
        if (dataFolder is not null) Directory.CreateDirectory(dataFolder);
        var server = new AzuriteServer(executable, FreePort.Next(), dataFolder);
        try
        {
            await server.StartAgainAsync();
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
        return server;
    }

    /// <summary>Starts Azurite (again) on the same port and data folder; returns once it accepts connections.</summary>
    public async Task StartAgainAsync()
    {
        if (Running) throw new InvalidOperationException($"Azurite on port {Port} is already running.");
        _process?.Dispose();
        var start = new ProcessStartInfo(_executable)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        var args = new List<string> { "--silent", "--blobHost", "127.0.0.1", "--blobPort", Port.ToString(), "--skipApiVersionCheck", "--loose", "--disableTelemetry" };
        args.AddRange(_dataFolder is null ? ["--inMemoryPersistence"] : ["--location", _dataFolder]);
        foreach (var arg in args) start.ArgumentList.Add(arg);
        var process = Process.Start(start) ?? throw new InvalidOperationException($"{_executable} did not start.");
        _process = process;
        process.OutputDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        await FreePort.WaitUntilAcceptingAsync(Port, TimeSpan.FromSeconds(90), "Azurite", () =>
        {
            lock (_output) return (process.HasExited ? $"It exited with code {process.ExitCode}. " : "") + _output;
        });
    }

    /// <summary>
    /// Stops Azurite as an operator would (SIGTERM, so a persistent instance writes its metadata out) and waits for the
    /// process to exit; the port then refuses connections until <see cref="StartAgainAsync"/>.
    /// </summary>
    public async Task StopAsync()
    {
        if (_process is not { HasExited: false } process) return;
        using (var kill = Process.Start(new ProcessStartInfo("kill") { ArgumentList = { "-TERM", process.Id.ToString() }, UseShellExecute = false })!)
            await kill.WaitForExitAsync();
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try { await process.WaitForExitAsync(deadline.Token); }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_process is not { } process) return;
        try
        {
            if (!process.HasExited)
            {
                process.Kill(entireProcessTree: true);
                await process.WaitForExitAsync();
            }
        }
        finally
        {
            process.Dispose();
        }
    }

    private static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "")
            .Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, name))
            .FirstOrDefault(File.Exists);
}
