// The socket work both kinds of data-plane link share (the collective's ring and point-to-point links, and the pipeline's
// stage links): a listener, and dialling with retries up to a deadline followed by the membership proof. What a hello
// says and what a refusal means stay with each link kind.
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace DeepSeekCluster.Training.Collectives;

internal static class LinkSockets
{
    /// <summary>A listening socket on <paramref name="bind"/> (any address, port 0 picks one, when null).</summary>
    public static Socket Listen(IPEndPoint? bind, int backlog)
    {
        bind ??= new IPEndPoint(IPAddress.Any, 0);
        var listener = new Socket(bind.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            listener.Bind(bind);
            listener.Listen(backlog);
            return listener;
        }
        catch { listener.Dispose(); throw; }
    }

    /// <summary>The time left until <paramref name="deadline"/>, never negative.</summary>
    public static TimeSpan Remaining(DateTime deadline)
    {
        var left = deadline - DateTime.UtcNow;
        return left > TimeSpan.Zero ? left : TimeSpan.Zero;
    }

    /// <summary>
    /// Dials <paramref name="endpoint"/> until <paramref name="deadline"/> (or <paramref name="stop"/>), retrying while
    /// nothing listens there yet, sends <paramref name="hello"/> and runs the proof (<see cref="LinkProof.Dial"/>).
    /// Returns the admitted socket, its send and receive timeouts still bounded by the deadline (the caller sets its own);
    /// throws what <paramref name="refused"/> makes of a refusal (the reason, and whether the listener failed to prove it
    /// is a member), or what <paramref name="stalled"/> makes of the last failed attempt when the deadline passes.
    /// </summary>
    public static Socket DialProved(EndPoint endpoint, DateTime deadline, CancellationToken stop, byte[] key, byte[] hello,
                                    Func<string, bool, Exception> refused, Func<Exception?, Exception> stalled)
    {
        Exception? last = null;
        while (DateTime.UtcNow < deadline && !stop.IsCancellationRequested)
        {
            var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                using (var cts = new CancellationTokenSource(Remaining(deadline)))
                    socket.ConnectAsync(endpoint, cts.Token).AsTask().GetAwaiter().GetResult();
                socket.ReceiveTimeout = socket.SendTimeout = (int)Math.Max(1, Remaining(deadline).TotalMilliseconds);
                using (var stream = new NetworkStream(socket, ownsSocket: false))
                using (var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
                using (var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true))
                {
                    if (LinkProof.Dial(reader, writer, key, hello, out bool listenerUnproven) is { } reason)
                    {
                        socket.Dispose();
                        throw refused(reason, listenerUnproven);
                    }
                }
                return socket;
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException or IOException or EndOfStreamException)
            {
                socket.Dispose();
                last = e;
                if (DateTime.UtcNow < deadline) Thread.Sleep(50); // not listening yet: retry until the deadline
            }
        }
        throw stalled(last);
    }
}
