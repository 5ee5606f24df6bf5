// Real Azurite that a test can stop and start again on the same port and data folder (an outage, then recovery).
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace DeepSeekCluster.DataShardService.Tests.Infrastructure;

/// <summary>
/// Unlike the shared AzuriteServer (in memory, one life), this one keeps its blobs in a folder, so what was
/// written before <see cref="StopAsync"/> is there again after <see cref="StartAsync"/>, at the same endpoint.
/// </summary>
public sealed class RestartableAzurite : IAsyncDisposable
{
    private readonly string _folder = TestCorpus.NewFolder("azurite-data");
    private readonly StringBuilder _output = new();
    private Process? _process;

    public int Port { get; } = FreePort.Next();

    public string ConnectionString => AzuriteServer.ConnectionString(Port);

    public async Task StartAsync()
    {
        if (_process is not null) throw new InvalidOperationException("Azurite is already running.");
        string executable = (Environment.GetEnvironmentVariable("PATH") ?? "")
            .Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, "azurite-blob")).FirstOrDefault(File.Exists)
            ?? throw new InvalidOperationException("azurite-blob is not on PATH; install it with `npm install -g azurite`.");
        var start = new ProcessStartInfo(executable) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var arg in new[] { "--silent", "--disableTelemetry", "--location", _folder, "--blobHost", "127.0.0.1", "--blobPort", Port.ToString(), "--skipApiVersionCheck", "--loose" })
            start.ArgumentList.Add(arg);
        var process = Process.Start(start) ?? throw new InvalidOperationException($"{executable} did not start.");
        process.OutputDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        _process = process;
        await FreePort.WaitUntilAcceptingAsync(Port, TimeSpan.FromSeconds(60), "Azurite", () =>
        {
            lock (_output) return (process.HasExited ? $"It exited with code {process.ExitCode}. " : "") + _output;
        });
    }

    /// <summary>
    /// Stops the server as an orchestrator would (SIGTERM: Azurite closes its port and saves its metadata database,
    /// which it otherwise saves only every few seconds) and waits until it is gone; kills it if it lingers.
    /// </summary>
    public async Task StopAsync()
    {
        if (_process is null) return;
        if (!_process.HasExited)
        {
            kill(_process.Id, Sigterm);
            using var grace = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            try
            {
                await _process.WaitForExitAsync(grace.Token);
            }
            catch (OperationCanceledException)
            {
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync();
            }
        }
        _process.Dispose();
        _process = null;
    }

    private const int Sigterm = 15;

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int signal);

    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        if (Directory.Exists(_folder)) Directory.Delete(_folder, recursive: true);
    }
}
