// Real Azurite that a test can stop and start again on the same port and data folder (an outage, then recovery).
using System.Diagnostics;
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
    /// Azurite writes blob bytes at once but saves its metadata database every few seconds; a kill before that save
    /// forgets the blob. Polls until the saved database mentions <paramref name="blobName"/>.
    /// </summary>
    public async Task WaitUntilPersistedAsync(string blobName)
    {
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (true)
        {
            foreach (string db in Directory.GetFiles(_folder, "__azurite_db_blob__*"))
            {
                try
                {
                    if ((await File.ReadAllTextAsync(db)).Contains(blobName, StringComparison.Ordinal)) return;
                }
                catch (IOException)
                {
                    // being rewritten right now; look again
                }
            }
            if (DateTime.UtcNow > until)
                throw new TimeoutException($"Azurite did not save the metadata of {blobName} under {_folder} within 60 s.");
            await Task.Delay(100);
        }
    }

    /// <summary>Kills the server (no graceful shutdown: an outage) and waits until it is gone.</summary>
    public async Task StopAsync()
    {
        if (_process is null) return;
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }
        _process.Dispose();
        _process = null;
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        if (Directory.Exists(_folder)) Directory.Delete(_folder, recursive: true);
    }
}
