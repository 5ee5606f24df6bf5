// One TCP connection to a peer rank, with a background sender so that sending to one neighbour overlaps receiving from the other.
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace DeepSeekCluster.Training.Collectives.Tcp;

/// <summary>
/// Frames on the wire: an 8-byte header (kind, payload length; little-endian int32s) and the payload. Data frames carry
/// tensor chunks; an abort frame carries the failure a rank saw, so that ranks downstream name the same peer.
/// </summary>
internal enum FrameKind { Data = 1, Abort = 2 }

internal sealed unsafe class PeerLink : IDisposable
{
    public int Rank { get; }
    public string Address { get; }
    public Socket Socket { get; }
    public string Name => CollectiveException.Peer(Rank, Address);
    /// <summary>Payload bytes of the frame being received that are not read yet (so a failure path can skip to the next frame).</summary>
    public int ReceiveRemaining { get; set; }
    /// <summary>Why the sender stopped, when it did: the failure this rank saw on sending to the peer.</summary>
    public CollectiveException? SendFault { get { lock (gate) return sendFault; } }

    readonly int ownRank;
    readonly object gate = new();
    readonly Queue<OutFrame> queue = new();
    Thread? sender;
    CollectiveException? sendFault;
    bool busy, closed;

    readonly record struct OutFrame(FrameKind Kind, IntPtr Data, int Length, byte[]? Managed);

    public PeerLink(Socket socket, int rank, string address, int ownRank, TimeSpan timeout)
    {
        Socket = socket;
        Rank = rank;
        Address = address;
        this.ownRank = ownRank;
        socket.NoDelay = true;
        socket.SendTimeout = (int)Math.Min(int.MaxValue, timeout.TotalMilliseconds); // a peer that reads nothing for this long is stalled
        socket.SendBufferSize = Math.Max(socket.SendBufferSize, 4 << 20);
        socket.ReceiveBufferSize = Math.Max(socket.ReceiveBufferSize, 4 << 20);
    }

    /// <summary>Queues a data frame of <paramref name="length"/> bytes at <paramref name="data"/>; the memory must stay valid until <see cref="WaitIdle"/>.</summary>
    public void Post(byte* data, int length) => Enqueue(new OutFrame(FrameKind.Data, (IntPtr)data, length, null), dropData: false);

    /// <summary>Drops queued data frames and queues an abort frame (after the frame in flight, to keep the framing).</summary>
    public void PostAbort(byte[] payload) => Enqueue(new OutFrame(FrameKind.Abort, IntPtr.Zero, payload.Length, payload), dropData: true);

    void Enqueue(OutFrame frame, bool dropData)
    {
        lock (gate)
        {
            if (closed || sendFault is not null) return;
            if (dropData) queue.Clear();
            queue.Enqueue(frame);
            if (sender is null)
            {
                sender = new Thread(SendLoop) { IsBackground = true, Name = $"collective send {ownRank}->{Rank}" };
                sender.Start();
            }
            Monitor.PulseAll(gate);
        }
    }

    /// <summary>Waits until every queued frame is on the wire (true), the sender failed (false), or <paramref name="limit"/> passed (false).</summary>
    public bool WaitIdle(TimeSpan limit)
    {
        var until = DateTime.UtcNow + limit;
        lock (gate)
        {
            while ((queue.Count > 0 || busy) && sendFault is null)
            {
                var left = until - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) return false;
                Monitor.Wait(gate, left);
            }
            return sendFault is null;
        }
    }

    void SendLoop()
    {
        Span<byte> header = stackalloc byte[8];
        while (true)
        {
            OutFrame frame;
            lock (gate)
            {
                while (queue.Count == 0 && !closed) Monitor.Wait(gate);
                if (closed) return;
                frame = queue.Dequeue();
                busy = true;
            }
            try
            {
                MemoryMarshal.Write(header, (int)frame.Kind);
                MemoryMarshal.Write(header[4..], frame.Length);
                SendAll(header);
                if (frame.Managed is not null) SendAll(frame.Managed);
                else SendAll(new ReadOnlySpan<byte>((void*)frame.Data, frame.Length));
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                var failure = e is SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock }
                    ? new CollectiveException(CollectiveFailure.PeerStalled, $"{Name} read nothing for the timeout (seen by rank {ownRank})", Rank, Address, e)
                    : new CollectiveException(CollectiveFailure.PeerLost, $"{Name} closed its connection (seen by rank {ownRank} while sending)", Rank, Address, e);
                lock (gate)
                {
                    sendFault ??= failure;
                    busy = false;
                    queue.Clear();
                    Monitor.PulseAll(gate);
                }
                return;
            }
            lock (gate)
            {
                busy = false;
                Monitor.PulseAll(gate);
            }
        }
    }

    void SendAll(ReadOnlySpan<byte> bytes)
    {
        while (bytes.Length > 0)
        {
            int sent = Socket.Send(bytes);
            bytes = bytes[sent..];
        }
    }

    /// <summary>Closes the connection; a send in flight fails at once, so the sender no longer touches tensor memory after <see cref="Dispose"/>.</summary>
    public void Dispose()
    {
        Thread? t;
        lock (gate)
        {
            closed = true;
            queue.Clear();
            Monitor.PulseAll(gate);
            t = sender;
        }
        try { Socket.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        Socket.Dispose();
        if (t is not null && t != Thread.CurrentThread) t.Join(TimeSpan.FromSeconds(5));
    }
}
