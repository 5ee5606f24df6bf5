// What the tests' faulty proxies share: a loopback listener that connects each client to the target port and hands the
// pair to the proxy's own forwarding (which decides how the connection fails: DroppingProxy, StallingProxy).
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public abstract class LoopbackForwarder : IDisposable
{
    readonly TcpListener listener = new(IPAddress.Loopback, 0);
    readonly int target;
    protected readonly CancellationTokenSource Stop = new();
    /// <summary>Every socket of every connection made so far (lock it to use it).</summary>
    protected readonly List<Socket> Open = [];

    protected LoopbackForwarder(int targetPort)
    {
        target = targetPort;
        listener.Start();
        Port = ((IPEndPoint)listener.LocalEndpoint).Port;
        _ = AcceptAsync();
    }

    public int Port { get; }

    /// <summary>Forwards between a client and its connection to the target, until either side or the proxy ends it.</summary>
    protected abstract Task ForwardAsync(Socket client, Socket server);

    /// <summary>Closes <paramref name="s"/> so that its peer sees a reset (linger 0), not an orderly end.</summary>
    protected static void Reset(Socket s)
    {
        try { s.LingerState = new LingerOption(true, 0); s.Close(); }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    async Task AcceptAsync()
    {
        while (!Stop.IsCancellationRequested)
        {
            Socket client;
            try { client = await listener.AcceptSocketAsync(Stop.Token); }
            catch (Exception) { return; }
            _ = ConnectAsync(client);
        }
    }

    async Task ConnectAsync(Socket client)
    {
        var server = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try { await server.ConnectAsync(IPAddress.Loopback, target); }
        catch (SocketException) { Reset(client); server.Dispose(); return; }
        lock (Open) { Open.Add(client); Open.Add(server); }
        await ForwardAsync(client, server);
    }

    /// <summary>Stops accepting and ends every connection (<see cref="Close"/>).</summary>
    public void Dispose()
    {
        Stop.Cancel();
        listener.Stop();
        lock (Open)
        {
            foreach (var s in Open) Close(s);
            Open.Clear();
        }
    }

    /// <summary>How <see cref="Dispose"/> ends a connection's socket: an orderly close unless the proxy says otherwise.</summary>
    protected virtual void Close(Socket s) => s.Dispose();
}
