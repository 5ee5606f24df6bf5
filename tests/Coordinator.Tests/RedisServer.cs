// A throwaway redis-server on a free port, killed on dispose. Without persistence by default; with a data folder it
// keeps an fsync'ed append-only file there, so a server started again on the same port and folder has the same data.
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.Coordinator.Tests;

public sealed class RedisServer : IDisposable
{
    private readonly Process _process;

    public string ConnectionString { get; }

    private RedisServer(Process process, int port)
    {
        _process = process;
        Port = port;
        ConnectionString = $"127.0.0.1:{port}";
    }

    public int Port { get; }

    /// <param name="port">A port of an earlier server (to start it again), or null for a free one.</param>
    /// <param name="dataFolder">Where to keep an append-only file (fsync'ed on every write); null: no persistence.</param>
    public static async Task<RedisServer> StartAsync(int? port = null, string? dataFolder = null)
    {
        int p = port ?? FreePort.Next();
        Process process;
        try
        {
            var info = new ProcessStartInfo("redis-server") { RedirectStandardOutput = true, RedirectStandardError = true };
            string[] persistence = dataFolder is null ? ["--appendonly", "no"] : ["--appendonly", "yes", "--appendfsync", "always", "--dir", dataFolder];
            foreach (var a in (string[])["--port", p.ToString(), "--bind", "127.0.0.1", "--save", "", .. persistence]) info.ArgumentList.Add(a);
            process = Process.Start(info)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException("redis-server is not installed (Debian: apt-get install redis-server); the Redis persistence test needs it", e);
        }
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();

        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (true)
        {
            if (process.HasExited) throw new InvalidOperationException($"redis-server exited with {process.ExitCode} before accepting connections on port {p}");
            if (await AnswersPing(p)) return new RedisServer(process, p);
            if (DateTime.UtcNow > deadline)
            {
                process.Kill();
                throw new TimeoutException($"redis-server did not answer PING on port {p} within 10 s");
            }
            await Task.Delay(50);
        }
    }

    static async Task<bool> AnswersPing(int port)
    {
        try
        {
            using var client = new TcpClient();
            await client.ConnectAsync(IPAddress.Loopback, port);
            var stream = client.GetStream();
            await stream.WriteAsync("PING\r\n"u8.ToArray());
            var buffer = new byte[16];
            int n = await stream.ReadAsync(buffer);
            return n >= 5 && System.Text.Encoding.ASCII.GetString(buffer, 0, n).StartsWith("+PONG");
        }
        catch (SocketException) { return false; }
    }

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill();
        _process.WaitForExit(5000);
        _process.Dispose();
    }
}
