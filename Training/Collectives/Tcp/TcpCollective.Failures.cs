// How a tcp collective operation fails: the verdict, the abort frame that carries it down the ring, and the grace spent
// listening for a better one. Not the data path (TcpCollective.cs) nor the handshake (TcpRendezvous.cs, LinkProof.cs).
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;

namespace DeepSeekCluster.Training.Collectives.Tcp;

public sealed unsafe partial class TcpCollective
{
    void RunRing(string op, Action body)
    {
        try { body(); }
        catch (Exception e) when (e is CollectiveException or SocketException or ObjectDisposedException)
        {
            throw Fail(op, e, ring: true);
        }
    }

    void RunPointToPoint(string op, int peer, Action<PeerLink> body)
    {
        try
        {
            if (!pointToPoint.TryGetValue(peer, out var link))
            {
                var deadline = DateTime.UtcNow + Options.Timeout;
                var socket = Rank < peer ? rendezvous.Dial(peer, LinkKind.PointToPoint, deadline) : rendezvous.AwaitIncoming(peer, LinkKind.PointToPoint, deadline);
                pointToPoint[peer] = link = new PeerLink(socket, peer, addresses[peer], Rank, Options.Timeout);
            }
            body(link);
        }
        catch (Exception e) when (e is CollectiveException or SocketException or ObjectDisposedException)
        {
            throw Fail(op, e, ring: false);
        }
    }

    CollectiveException Fail(string op, Exception error, bool ring)
    {
        var verdict = disposed ? Disposed()
            : error as CollectiveException ?? new CollectiveException(CollectiveFailure.PeerLost, error.Message, inner: error);
        if (ring && !disposed && next is not null && prev is not null && verdict.Failure != CollectiveFailure.Unavailable)
        {
            next.PostAbort(EncodeAbort(verdict));
            // A successor that closed may have died, or may have given up on a failure upstream of it and closed all its
            // links: then the predecessor's abort frame names the rank where the ring really broke. Listen for it too.
            bool successorClosed = verdict.Failure == CollectiveFailure.PeerLost && verdict.PeerRank == next.Rank && next.Rank != prev.Rank;
            if (verdict.Failure == CollectiveFailure.PeerStalled || successorClosed) verdict = ListenForBetterVerdict(verdict);
            next.WaitIdle(grace < TimeSpan.FromSeconds(1) ? grace : TimeSpan.FromSeconds(1));
            next.Dispose(); // the successor reads our abort frame, then end of stream; the sender stops touching tensor memory
        }
        else if (!ring)
            foreach (var link in pointToPoint.Values) link.Dispose();
        fault = new CollectiveException(verdict.Failure,
            $"{op} failed on rank {Rank} (job '{JobId}', generation {Generation}): {verdict.Message}", verdict.PeerRank, verdict.PeerAddress, error);
        return fault;
    }

    /// <summary>
    /// After a suspicion, keeps reading the predecessor for the grace period: data is skipped, and an abort frame from
    /// upstream (a rank nearer the real stall, or a definite failure) replaces the verdict and is passed on.
    /// </summary>
    CollectiveException ListenForBetterVerdict(CollectiveException verdict)
    {
        long until = Stopwatch.GetTimestamp() + (long)(grace.TotalSeconds * Stopwatch.Frequency);
        byte* header = stackalloc byte[8];
        try
        {
            fixed (byte* skip = scratch)
                while (true)
                {
                    while (prev!.ReceiveRemaining > 0)
                        if (!ReceiveExactly(prev, skip, Math.Min(prev.ReceiveRemaining, scratch.Length), payload: true, until)) return verdict;
                    if (!ReceiveExactly(prev, header, 8, payload: false, until)) return verdict;
                    var kind = (FrameKind)(*(int*)header);
                    int size = *(int*)(header + 4);
                    if (kind == FrameKind.Data) { prev.ReceiveRemaining = size; continue; }
                    if (kind != FrameKind.Abort || size is < 0 or > 1 << 20) return verdict;
                    var payload = new byte[size];
                    fixed (byte* p = payload)
                        if (!ReceiveExactly(prev, p, size, payload: false, until)) return verdict;
                    verdict = DecodeAbort(payload);
                    next!.PostAbort(payload);
                    if (verdict.Failure != CollectiveFailure.PeerStalled) return verdict;
                }
        }
        catch (CollectiveException) { return verdict; } // the predecessor closed after its own abort frames
    }

    static byte[] EncodeAbort(CollectiveException verdict)
    {
        using var buffer = new MemoryStream();
        using (var writer = new BinaryWriter(buffer, Encoding.UTF8))
        {
            writer.Write((int)verdict.Failure);
            writer.Write(verdict.PeerRank ?? -1);
            writer.Write(verdict.PeerAddress ?? "");
            writer.Write(verdict.Message);
        }
        return buffer.ToArray();
    }

    static CollectiveException DecodeAbort(byte[] payload)
    {
        using var reader = new BinaryReader(new MemoryStream(payload), Encoding.UTF8);
        var failure = (CollectiveFailure)reader.ReadInt32();
        int rank = reader.ReadInt32();
        string address = reader.ReadString(), message = reader.ReadString();
        return new CollectiveException(failure, message, rank >= 0 ? rank : null, address.Length > 0 ? address : null);
    }

    CollectiveException Lost(PeerLink from, string what, Exception? inner = null) =>
        new(CollectiveFailure.PeerLost, $"{from.Name} {what} (seen by rank {Rank})", from.Rank, from.Address, inner);

    CollectiveException Disposed() =>
        new(CollectiveFailure.Unavailable, $"the tcp collective of rank {Rank} (generation {Generation}) was disposed");
}
