// A loopback TCP forwarder that resets every connection once, after a given number of bytes went from client to server:
// a connection dropped in the middle of an upload.
using System.Net.Sockets;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class DroppingProxy(int targetPort, long dropAfterBytes) : LoopbackForwarder(targetPort)
{
    long forwarded;
    int dropped;

    /// <summary>True once the connections were reset.</summary>
    public bool Dropped => Volatile.Read(ref dropped) == 1;

    protected override async Task ForwardAsync(Socket client, Socket server)
    {
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
                if (upstream && Interlocked.Add(ref forwarded, n) >= dropAfterBytes && Interlocked.Exchange(ref dropped, 1) == 0) DropAll();
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    void DropAll()
    {
        lock (Open)
        {
            foreach (var s in Open) Reset(s);
            Open.Clear();
        }
    }

    protected override void Close(Socket s) => Reset(s);
}
