// A loopback TCP forwarder that goes silent in one direction after a given number of bytes, keeping every connection
// open: a store that stopped answering (downstream) or stopped reading (upstream) without closing anything. Not a
// proxy that drops connections (DroppingProxy).
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class StallingProxy : IDisposable
{
    readonly TcpListener listener = new(IPAddress.Loopback, 0);
    readonly CancellationTokenSource stop = new();
    readonly List<Socket> open = [];
    readonly int target;
    // Bytes each direction may still forward, over all connections; long.MaxValue: no stall.
    long upstreamLeft, downstreamLeft;
    int stalled;

    /// <param name="upstreamBytes">Client-to-server bytes forwarded before that direction goes silent (null: never).</param>
    /// <param name="downstreamBytes">Server-to-client bytes forwarded before that direction goes silent (null: never).</param>
    public StallingProxy(int targetPort, long? upstreamBytes = null, long? downstreamBytes = null)
    {
        target = targetPort;
        upstreamLeft = upstreamBytes ?? long.MaxValue;
        downstreamLeft = downstreamBytes ?? long.MaxValue;
        listener.Start();
        Port = ((IPEndPoint)listener.LocalEndpoint).Port;
        _ = AcceptAsync();
    }

    public int Port { get; }

    /// <summary>True once a direction went silent: its budget was used up and bytes were held back.</summary>
    public bool Stalled => Volatile.Read(ref stalled) == 1;

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
        catch (SocketException) { client.Dispose(); server.Dispose(); return; }
        lock (open) { open.Add(client); open.Add(server); }
        _ = PumpAsync(client, server, upstream: true);
        _ = PumpAsync(server, client, upstream: false);
    }

    async Task PumpAsync(Socket from, Socket to, bool upstream)
    {
        byte[] buffer = new byte[16 * 1024];
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None, stop.Token);
                if (n == 0) { to.Shutdown(SocketShutdown.Send); return; }
                long granted = Take(upstream, n);
                if (granted > 0) await to.SendAsync(buffer.AsMemory(0, (int)granted), SocketFlags.None, stop.Token);
                if (granted < n)
                {
                    // Silent from here on: this direction reads no more, so the sender's writes back up as a stalled peer's do.
                    Volatile.Write(ref stalled, 1);
                    return;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or OperationCanceledException) { }
    }

    long Take(bool upstream, int wanted)
    {
        ref long left = ref upstream ? ref upstreamLeft : ref downstreamLeft;
        while (true)
        {
            long now = Volatile.Read(ref left), granted = Math.Min(now, wanted);
            if (Interlocked.CompareExchange(ref left, now - granted, now) == now) return granted;
        }
    }

    public void Dispose()
    {
        stop.Cancel();
        listener.Stop();
        lock (open)
        {
            foreach (var s in open) s.Dispose();
            open.Clear();
        }
    }
}
