// Where a pipeline stage waits for the link from the stage before it; the handshake fences other jobs, generations and
// positions, and proves membership (LinkProof).
using System.Net;
using System.Net.Sockets;
using System.Text;
using DeepSeekCluster.Training.Collectives;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// Bind first (port 0 picks one), publish <see cref="LocalEndpoint"/>, then <see cref="Accept"/> the previous stage.
/// A connection whose handshake names another job, another generation, or a dialer that is not stage − 1 of the same
/// replica is refused with the reason and the wait goes on, so a zombie of an older generation can never feed a stage.
/// A dialer whose fields pass must then prove it holds the generation's link key, and the listener proves the same to
/// it (<see cref="LinkProof"/>); every refusal is counted and announced by <see cref="LinkRefusals"/>.
/// </summary>
public sealed class StageListener : IDisposable
{
    public string JobId { get; }
    public long Generation { get; }
    public int Stage { get; }
    public int Replica { get; }
    public IPEndPoint LocalEndpoint { get; }
    /// <summary>Why the last connection was refused, for logs and tests.</summary>
    public string? LastRefusal { get; private set; }

    readonly Socket listener;
    readonly byte[] linkKey; // never logged, never a property

    /// <param name="linkKey">The generation's link key from the assignment (at least 16 bytes; the coordinator makes 32).</param>
    public StageListener(string jobId, long generation, byte[] linkKey, int stage, int replica, IPEndPoint? bind = null)
    {
        this.linkKey = LinkProof.CheckKey(linkKey, nameof(linkKey));
        if (stage < 0) throw new ArgumentOutOfRangeException(nameof(stage), stage, "stage must be >= 0");
        JobId = jobId;
        Generation = generation;
        Stage = stage;
        Replica = replica;
        listener = LinkSockets.Listen(bind, backlog: 16);
        LocalEndpoint = (IPEndPoint)listener.LocalEndPoint!;
    }

    /// <summary>
    /// Waits up to <paramref name="timeout"/> for stage − 1 of this replica, published at <paramref name="peerAddress"/>
    /// (used to name it); the link's sends and receives get the same timeout.
    /// </summary>
    public StageLink Accept(string peerAddress, TimeSpan timeout)
    {
        if (Stage == 0) throw new InvalidOperationException("stage 0 has no previous stage to accept");
        var deadline = DateTime.UtcNow + timeout;
        string name = $"pipeline stage {Stage - 1} (replica {Replica}, {peerAddress})";
        while (true)
        {
            Socket socket;
            try
            {
                using var cts = new CancellationTokenSource(LinkSockets.Remaining(deadline));
                socket = listener.AcceptAsync(cts.Token).AsTask().GetAwaiter().GetResult();
            }
            catch (OperationCanceledException e)
            {
                string refused = LastRefusal is null ? "" : $"; last refusal: {LastRefusal}";
                throw new CollectiveException(CollectiveFailure.PeerStalled,
                    $"{name} did not connect to stage {Stage} within {timeout.TotalSeconds:0.#} s{refused}", Stage - 1, peerAddress, e);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                throw new CollectiveException(CollectiveFailure.Unavailable, $"stage {Stage} stopped listening for {name}: {e.Message}", Stage - 1, peerAddress, e);
            }
            if (Handshake(socket, deadline, peerAddress, timeout) is { } link) return link;
        }
    }

    StageLink? Handshake(Socket socket, DateTime deadline, string peerAddress, TimeSpan timeout)
    {
        string remote = "unknown";
        bool hello = false;
        try
        {
            remote = socket.RemoteEndPoint?.ToString() ?? remote;
            // A handshake is a few hundred bytes: a silent connection must not hold the wait for the real stage - 1 for long.
            socket.ReceiveTimeout = socket.SendTimeout = (int)Math.Clamp(LinkSockets.Remaining(deadline).TotalMilliseconds, 1, 10_000);
            using var stream = new NetworkStream(socket, ownsSocket: false);
            using var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true);
            using var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            int magic = reader.ReadInt32(), version = reader.ReadInt32();
            hello = true;
            string? reason;
            if (magic != StageLink.Magic) reason = $"not a pipeline link (magic {magic:x8}, version {version})";
            else
            {
                string job = reader.ReadString();
                long generation = reader.ReadInt64();
                int stage = reader.ReadInt32(), replica = reader.ReadInt32();
                // Version 1 sent these same fields and nothing after them: read whole, its refusal reaches it before the close.
                var dialerNonce = version == StageLink.Version ? LinkProof.ReadExactly(reader, LinkProof.NonceBytes) : [];
                reason = version != StageLink.Version ? $"pipeline link version {version}; this stage speaks version {StageLink.Version}, which proves membership with the generation's link key"
                    : job != JobId ? $"job '{job}' is not this stage's job '{JobId}'"
                    : generation != Generation ? $"generation {generation} is not this stage's generation {Generation}"
                    : stage != Stage - 1 || replica != Replica ? $"stage {stage} replica {replica} is not stage {Stage - 1} replica {Replica}, the only one that feeds stage {Stage}"
                    : LinkProof.Challenge(reader, writer, linkKey, StageLink.Hello(job, generation, stage, replica), dialerNonce);
            }
            if (reason is not null)
            {
                Refuse(socket, magic == StageLink.Magic ? writer : null, remote, reason);
                return null;
            }
            LinkProof.Admit(writer);
            return new StageLink(socket, Stage, Stage - 1, Replica, peerAddress, timeout);
        }
        catch (Exception e) when (e is SocketException or IOException or EndOfStreamException)
        {
            // A connection that closes before saying anything is a port probe or a dial given up, not a refusal.
            if (hello) Refuse(socket, null, remote, $"the handshake broke off: {e.Message}");
            else socket.Dispose();
            return null;
        }
    }

    void Refuse(Socket socket, BinaryWriter? writer, string remote, string reason)
    {
        LastRefusal = $"{remote}: {reason}";
        LinkRefusals.Record(LinkRefusals.Stage, remote, reason);
        try { if (writer is not null) LinkProof.Refuse(writer, reason); }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
        socket.Dispose();
    }

    public void Dispose() => listener.Dispose();
}
