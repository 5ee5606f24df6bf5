// Real Azurite (npm `azurite`) as a child process on a free port, in memory, killed on dispose.
using System.Diagnostics;
using System.Text;

namespace DeepSeekCluster.Tests.Shared;

public sealed class AzuriteServer : IAsyncDisposable
{
    // Azurite's well-known development account.
    private const string Account = "devstoreaccount1";
    private const string Key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    private readonly Process _process;
    private readonly StringBuilder _output = new();

    private AzuriteServer(Process process, int port)
    {
        _process = process;
        Port = port;
    }

    public int Port { get; }

    /// <summary>An explicit connection string for Azurite listening on <paramref name="port"/> (the server's own or a proxy's).</summary>
    public static string ConnectionString(int port) =>
        $"DefaultEndpointsProtocol=http;AccountName={Account};AccountKey={Key};BlobEndpoint=http://127.0.0.1:{port}/{Account};";

    public static async Task<AzuriteServer> StartAsync()
    {
        string executable = FindOnPath("azurite-blob") ?? throw new InvalidOperationException(
            "azurite-blob is not on PATH. These tests run against real Azurite: install it with `npm install -g azurite` (Node.js 18+).");
        int port = FreePort.Next();
        var start = new ProcessStartInfo(executable)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var arg in new[] { "--silent", "--inMemoryPersistence", "--blobHost", "127.0.0.1", "--blobPort", port.ToString(), "--skipApiVersionCheck", "--loose" })
            start.ArgumentList.Add(arg);
        var process = Process.Start(start) ?? throw new InvalidOperationException($"{executable} did not start.");
        var server = new AzuriteServer(process, port);
        process.OutputDataReceived += (_, e) => { lock (server._output) server._output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { lock (server._output) server._output.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        try
        {
            await FreePort.WaitUntilAcceptingAsync(port, TimeSpan.FromSeconds(30), "Azurite", () =>
            {
                lock (server._output) return (process.HasExited ? $"It exited with code {process.ExitCode}. " : "") + server._output;
            });
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
        return server;
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync();
            }
        }
        finally
        {
            _process.Dispose();
        }
    }

    private static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "")
            .Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, name))
            .FirstOrDefault(File.Exists);
}
