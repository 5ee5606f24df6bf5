// A loopback TCP forwarder that goes silent in one direction after a given number of bytes, keeping every connection
// open: a store that stopped answering (downstream) or stopped reading (upstream) without closing anything. Not a
// proxy that drops connections (DroppingProxy).
using System.Net.Sockets;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class StallingProxy : LoopbackForwarder
{
    // Bytes each direction may still forward, over all connections; long.MaxValue: no stall.
    long upstreamLeft, downstreamLeft;
    int stalled;

    /// <param name="upstreamBytes">Client-to-server bytes forwarded before that direction goes silent (null: never).</param>
    /// <param name="downstreamBytes">Server-to-client bytes forwarded before that direction goes silent (null: never).</param>
    public StallingProxy(int targetPort, long? upstreamBytes = null, long? downstreamBytes = null) : base(targetPort)
    {
        upstreamLeft = upstreamBytes ?? long.MaxValue;
        downstreamLeft = downstreamBytes ?? long.MaxValue;
    }

    /// <summary>True once a direction went silent: its budget was used up and bytes were held back.</summary>
    public bool Stalled => Volatile.Read(ref stalled) == 1;

    protected override Task ForwardAsync(Socket client, Socket server) =>
        Task.WhenAll(PumpAsync(client, server, upstream: true), PumpAsync(server, client, upstream: false));

    async Task PumpAsync(Socket from, Socket to, bool upstream)
    {
        byte[] buffer = new byte[16 * 1024];
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None, Stop.Token);
                if (n == 0) { to.Shutdown(SocketShutdown.Send); return; }
                long granted = Take(upstream, n);
                if (granted > 0) await to.SendAsync(buffer.AsMemory(0, (int)granted), SocketFlags.None, Stop.Token);
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
}
