// A loopback TCP forwarder that resets every connection once, after a given number of bytes went from client to server:
// a connection dropped in the middle of an upload.
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class DroppingProxy : IDisposable
{
    readonly TcpListener listener = new(IPAddress.Loopback, 0);
    readonly CancellationTokenSource stop = new();
    readonly List<Socket> open = [];
    readonly int target;
    readonly long dropAfter;
    long forwarded;
    int dropped;

    public DroppingProxy(int targetPort, long dropAfterBytes)
    {
        (target, dropAfter) = (targetPort, dropAfterBytes);
        listener.Start();
        Port = ((IPEndPoint)listener.LocalEndpoint).Port;
        _ = AcceptAsync();
    }

    public int Port { get; }

    /// <summary>True once the connections were reset.</summary>
    public bool Dropped => Volatile.Read(ref dropped) == 1;

    async Task AcceptAsync()
    {
        while (!stop.IsCancellationRequested)
        {
            Socket client;
            try { client = await listener.AcceptSocketAsync(stop.Token); }
            catch (Exception) { return; }
            _ = ForwardAsync(client);
        }
    }

    async Task ForwardAsync(Socket client)
    {
        var server = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try { await server.ConnectAsync(IPAddress.Loopback, target); }
        catch (SocketException) { Reset(client); server.Dispose(); return; }
        lock (open) { open.Add(client); open.Add(server); }
        await Task.WhenAny(PumpAsync(client, server, upstream: true), PumpAsync(server, client, upstream: false));
        Reset(client);
        Reset(server);
    }

    async Task PumpAsync(Socket from, Socket to, bool upstream)
    {
        byte[] buffer = new byte[16 * 1024];
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None);
                if (n == 0) return;
                await to.SendAsync(buffer.AsMemory(0, n), SocketFlags.None);
                if (upstream && Interlocked.Add(ref forwarded, n) >= dropAfter && Interlocked.Exchange(ref dropped, 1) == 0) DropAll();
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    void DropAll()
    {
        lock (open)
        {
            foreach (var s in open) Reset(s);
            open.Clear();
        }
    }

    static void Reset(Socket s)
    {
        try { s.LingerState = new LingerOption(true, 0); s.Close(); } // linger 0: the peer sees a reset
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    public void Dispose()
    {
        stop.Cancel();
        listener.Stop();
        DropAll();
    }
}
