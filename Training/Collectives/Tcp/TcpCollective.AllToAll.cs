// All-to-all with per-peer counts over direct links between every pair of ranks: all sends posted at once, then the receives.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives.Tcp;

public sealed unsafe partial class TcpCollective
{
    /// <summary>
    /// A pairwise exchange over the point-to-point links (made on first use, in one global order of rank pairs so no two
    /// ranks wait on each other): this rank posts every block to its peer's background sender at once, copies its own,
    /// then receives from rank r+1, r+2, … in turn. Sending never waits for a receive, so the order cannot deadlock. A
    /// peer that dies or sends nothing for 0.9·Timeout fails the operation naming it; the links are then closed, so the
    /// other ranks fail within their timeout too, naming this rank or the peer itself.
    /// </summary>
    public void AllToAll(Tensor input, long[] sendRows, Tensor output, long[] receiveRows)
    {
        Begin("all-to-all", input);
        Begin("all-to-all", output);
        var (rowElements, es) = AllToAllPlan.Check(input, sendRows, output, receiveRows, WorldSize);
        long rowBytes = rowElements * es;
        using var noGrad = no_grad();
        using var send = new ContiguousView(input, writeBack: false);
        using var receive = new ContiguousView(output, writeBack: true);
        var sendAt = Offsets(sendRows);
        var receiveAt = Offsets(receiveRows);
        try
        {
            ConnectAllPeers();
            byte* from = (byte*)send.Data, into = (byte*)receive.Data;
            Buffer.MemoryCopy(from + sendAt[Rank] * rowBytes, into + receiveAt[Rank] * rowBytes, receiveRows[Rank] * rowBytes, sendRows[Rank] * rowBytes);
            if (sendRows[Rank] != receiveRows[Rank])
                throw new ArgumentException($"rank {Rank} sends itself {sendRows[Rank]} rows but expects {receiveRows[Rank]}");
            for (int s = 1; s < WorldSize; s++)
            {
                int peer = (Rank + s) % WorldSize;
                var link = pointToPoint[peer];
                foreach (var (offset, count) in Chunks(sendAt[peer] * rowElements, sendRows[peer] * rowElements, es))
                    link.Post(from + offset * es, count * es);
            }
            sendingTo = null; // each receive below watches its own peer; a failed send shows when it is awaited
            for (int s = 1; s < WorldSize; s++)
            {
                int peer = (Rank - s + WorldSize) % WorldSize;
                var link = pointToPoint[peer];
                foreach (var (offset, count) in Chunks(receiveAt[peer] * rowElements, receiveRows[peer] * rowElements, es))
                    ReceiveFrame(link, into + offset * es, count * es);
            }
            foreach (var link in pointToPoint.Values) AwaitSent(link); // the senders read the input until here
        }
        catch (Exception e) when (e is CollectiveException or System.Net.Sockets.SocketException or ObjectDisposedException)
        {
            // Let the blocks already posted reach the healthy peers before the links close: a peer still waiting for
            // this rank's block would otherwise see this rank close and blame it instead of the rank that failed.
            var drain = grace < TimeSpan.FromSeconds(1) ? grace : TimeSpan.FromSeconds(1);
            if (!disposed) foreach (var link in pointToPoint.Values) link.WaitIdle(drain);
            throw Fail("all-to-all", e, ring: false);
        }
    }

    static long[] Offsets(long[] rows)
    {
        var at = new long[rows.Length];
        for (int i = 1; i < rows.Length; i++) at[i] = at[i - 1] + rows[i - 1];
        return at;
    }

    /// <summary>
    /// Makes the missing point-to-point links, rank pairs in one global order ((0,1), (0,2), …, (1,2), …): the lower rank
    /// dials, the higher waits, and since every rank takes its pairs in that order, each wait is for a peer already at it.
    /// </summary>
    void ConnectAllPeers()
    {
        var deadline = DateTime.UtcNow + Options.Timeout;
        for (int peer = 0; peer < WorldSize; peer++)
        {
            if (peer == Rank || pointToPoint.ContainsKey(peer)) continue;
            var socket = Rank < peer ? rendezvous.Dial(peer, LinkKind.PointToPoint, deadline) : rendezvous.AwaitIncoming(peer, LinkKind.PointToPoint, deadline);
            pointToPoint[peer] = new PeerLink(socket, peer, addresses[peer], Rank, Options.Timeout);
        }
    }
}
