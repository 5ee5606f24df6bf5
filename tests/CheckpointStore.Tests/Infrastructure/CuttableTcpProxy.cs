// A loopback TCP forwarder whose link can be cut and restored: storage that becomes unreachable, as the network sees it.
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.CheckpointStore.Tests.Infrastructure;

public sealed class CuttableTcpProxy : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly int _target;
    private readonly List<Socket> _open = [];
    private readonly CancellationTokenSource _stop = new();
    private volatile bool _cut;

    public CuttableTcpProxy(int targetPort)
    {
        _target = targetPort;
        _listener.Start();
        Port = ((IPEndPoint)_listener.LocalEndpoint).Port;
        _ = AcceptLoopAsync();
    }

    public int Port { get; }

    /// <summary>Resets every open connection and every new one until <see cref="Restore"/>.</summary>
    public void Cut()
    {
        _cut = true;
        lock (_open)
        {
            foreach (var s in _open) Abort(s);
            _open.Clear();
        }
    }

    public void Restore() => _cut = false;

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try { client = await _listener.AcceptSocketAsync(_stop.Token); }
            catch (Exception) { return; }
            if (_cut) { Abort(client); continue; }
            _ = ForwardAsync(client);
        }
    }

    private async Task ForwardAsync(Socket client)
    {
        var server = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try { await server.ConnectAsync(IPAddress.Loopback, _target); }
        catch (SocketException) { Abort(client); server.Dispose(); return; }
        lock (_open) { _open.Add(client); _open.Add(server); }
        await Task.WhenAny(PumpAsync(client, server), PumpAsync(server, client));
        Abort(client);
        Abort(server);
    }

    private static async Task PumpAsync(Socket from, Socket to)
    {
        byte[] buffer = new byte[81920];
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None);
                if (n == 0) return;
                await to.SendAsync(buffer.AsMemory(0, n), SocketFlags.None);
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    private static void Abort(Socket s)
    {
        try { s.LingerState = new LingerOption(true, 0); s.Close(); } // linger 0: the peer sees a reset, as when a host vanishes
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Stop();
        Cut();
    }
}
