// Forms a tcp collective: listen, dial the ring successor, accept the ring predecessor; a handshake fences other jobs and
// generations and proves membership (LinkProof).
using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace DeepSeekCluster.Training.Collectives.Tcp;

internal enum LinkKind : byte { Ring = 1, PointToPoint = 2 }

/// <summary>
/// The rendezvous of one rank. Bind first (the port can be 0), publish <see cref="LocalEndpoint"/> (the coordinator
/// brokers the list), then <see cref="Connect"/> with every rank's "host:port". Each connection opens with a handshake
/// (magic, version, job id, generation, world size, rank, link kind); the acceptor refuses any that does not match its
/// own job and generation, so a zombie of an older generation can never join a newer group, and then both ends prove
/// they hold the generation's link key (<see cref="LinkProof"/>), so knowing the job and generation is not enough.
/// Refusals are counted and announced by <see cref="LinkRefusals"/>. The listener stays open for the group's lifetime:
/// point-to-point links are dialled on first use (the lower rank dials).
/// </summary>
public sealed class TcpRendezvous : IDisposable
{
    const int Magic = 0x43435344; // "DSCC"
    const int Version = 2; // 2: the membership proof follows the hello

    public string JobId { get; }
    public long Generation { get; }
    public int Rank { get; }
    public int WorldSize { get; }
    public IPEndPoint LocalEndpoint { get; }
    /// <summary>Connections refused by the handshake (wrong job, generation, world size or rank, or no membership proof).</summary>
    public int RefusedCount => refusedCount;
    /// <summary>Why the last connection was refused, for logs.</summary>
    public string? LastRefusal { get; private set; }

    readonly Socket listener;
    readonly byte[] linkKey; // never logged, never a property
    readonly CancellationTokenSource stop = new();
    readonly ConcurrentDictionary<(LinkKind, int), TaskCompletionSource<Socket>> incoming = new();
    int refusedCount;
    IReadOnlyList<string>? addresses;

    /// <param name="linkKey">The generation's link key from the assignment (at least 16 bytes; the coordinator makes 32).</param>
    public TcpRendezvous(string jobId, long generation, byte[] linkKey, int rank, int worldSize, IPEndPoint? bind = null)
    {
        this.linkKey = LinkProof.CheckKey(linkKey, nameof(linkKey));
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "world size must be at least 1");
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must be in [0, {worldSize})");
        if (Encoding.UTF8.GetByteCount(jobId) > 1024) throw new ArgumentException("job id longer than 1024 bytes", nameof(jobId));
        JobId = jobId;
        Generation = generation;
        Rank = rank;
        WorldSize = worldSize;
        listener = LinkSockets.Listen(bind, backlog: 64);
        LocalEndpoint = (IPEndPoint)listener.LocalEndPoint!;
        _ = AcceptLoop();
    }

    /// <summary>Binds on the port of <paramref name="endpoints"/>[rank] and connects: a static endpoint list, no broker.</summary>
    public static TcpCollective Connect(string jobId, long generation, byte[] linkKey, int rank, IReadOnlyList<string> endpoints, TcpCollectiveOptions? options = null)
    {
        if (rank < 0 || rank >= endpoints.Count) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must index the {endpoints.Count} endpoints");
        var own = ParseEndpoint(endpoints[rank]);
        var bind = new IPEndPoint(own is IPEndPoint ip ? ip.Address : IPAddress.Any, own is IPEndPoint p ? p.Port : ((DnsEndPoint)own).Port);
        var rendezvous = new TcpRendezvous(jobId, generation, linkKey, rank, endpoints.Count, bind);
        try { return rendezvous.Connect(endpoints, options); }
        catch { rendezvous.Dispose(); throw; }
    }

    /// <summary>
    /// Forms the ring with every rank's endpoint ("host:port", indexed by rank) and returns the collective, which then
    /// owns this rendezvous. Fails within the timeout, naming the peer that did not connect or that refused us.
    /// </summary>
    public TcpCollective Connect(IReadOnlyList<string> endpoints, TcpCollectiveOptions? options = null)
    {
        options ??= new TcpCollectiveOptions();
        if (endpoints.Count != WorldSize)
            throw new ArgumentException($"{endpoints.Count} endpoints given for a world of {WorldSize}", nameof(endpoints));
        foreach (var e in endpoints) ParseEndpoint(e);
        addresses = endpoints.ToArray();
        var deadline = DateTime.UtcNow + options.Timeout;
        if (WorldSize == 1) return new TcpCollective(this, addresses, null, null, options);

        int next = (Rank + 1) % WorldSize, prev = (Rank - 1 + WorldSize) % WorldSize;
        // Dedicated threads, not the pool: a group of ranks in one process (tests) would otherwise starve it of threads.
        var dialing = Task.Factory.StartNew(() => Dial(next, LinkKind.Ring, deadline), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        var accepted = Slot(LinkKind.Ring, prev).Task;
        Socket? prevSocket = null;
        try
        {
            Task.WaitAny([dialing, accepted], LinkSockets.Remaining(deadline)); // a refusal while dialing ends the wait at once
            if (dialing.IsFaulted) dialing.GetAwaiter().GetResult();
            prevSocket = AwaitIncoming(prev, LinkKind.Ring, deadline);
            var nextSocket = dialing.GetAwaiter().GetResult();
            var collective = new TcpCollective(this, addresses,
                new PeerLink(nextSocket, next, addresses[next], Rank, options.Timeout),
                new PeerLink(prevSocket, prev, addresses[prev], Rank, options.Timeout), options);
            collective.Barrier(); // every rank's ring links are up before anyone returns
            return collective;
        }
        catch
        {
            prevSocket?.Dispose();
            if (dialing.IsCompletedSuccessfully) dialing.Result.Dispose();
            else _ = dialing.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); }, TaskScheduler.Default);
            throw;
        }
    }

    internal string AddressOf(int rank) => addresses?[rank] ?? "unknown address";

    /// <summary>Dials <paramref name="peer"/> (retrying while it is not listening yet) and completes the handshake.</summary>
    internal Socket Dial(int peer, LinkKind kind, DateTime deadline)
    {
        var address = AddressOf(peer);
        string name = CollectiveException.Peer(peer, address);
        var socket = LinkSockets.DialProved(ParseEndpoint(address), deadline, stop.Token, linkKey, Hello(kind, JobId, Generation, WorldSize, Rank),
            refused: (reason, impostor) =>
            {
                if (!impostor)
                    return new CollectiveException(CollectiveFailure.Refused,
                        $"{name} refused rank {Rank} of job '{JobId}' generation {Generation}: {reason}", peer, address);
                LinkRefusals.Record(LinkRefusals.Ring, address, reason);
                return new CollectiveException(CollectiveFailure.Refused,
                    $"{name} is not a member of job '{JobId}' generation {Generation}: {reason}", peer, address);
            },
            stalled: last => new CollectiveException(CollectiveFailure.PeerStalled,
                $"{name} did not accept a connection from rank {Rank} within the rendezvous timeout ({last?.Message ?? "no attempt"})", peer, address, last));
        socket.ReceiveTimeout = 0;
        return socket;
    }

    /// <summary>Waits for <paramref name="peer"/> to dial us with a handshake that the accept loop has validated.</summary>
    internal Socket AwaitIncoming(int peer, LinkKind kind, DateTime deadline)
    {
        var slot = Slot(kind, peer);
        if (slot.Task.Wait(LinkSockets.Remaining(deadline))) return slot.Task.Result;
        string refused = refusedCount > 0 ? $"; {refusedCount} connection(s) refused, last: {LastRefusal}" : "";
        throw new CollectiveException(CollectiveFailure.PeerStalled,
            $"{CollectiveException.Peer(peer, AddressOf(peer))} did not connect to rank {Rank} within the timeout{refused}", peer, AddressOf(peer));
    }

    TaskCompletionSource<Socket> Slot(LinkKind kind, int peer) =>
        incoming.GetOrAdd((kind, peer), _ => new TaskCompletionSource<Socket>(TaskCreationOptions.RunContinuationsAsynchronously));

    async Task AcceptLoop()
    {
        while (!stop.IsCancellationRequested)
        {
            Socket socket;
            try { socket = await listener.AcceptAsync(stop.Token).ConfigureAwait(false); }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException) { return; }
            _ = Task.Factory.StartNew(() => Admit(socket), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }
    }

    void Admit(Socket socket)
    {
        string remote = "unknown";
        bool hello = false;
        try
        {
            remote = socket.RemoteEndPoint?.ToString() ?? remote;
            socket.NoDelay = true;
            socket.ReceiveTimeout = socket.SendTimeout = 10_000; // a handshake is a few hundred bytes
            using var stream = new NetworkStream(socket, ownsSocket: false);
            using var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true);
            using var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            int magic = reader.ReadInt32(), version = reader.ReadInt32();
            hello = true;
            if (magic != Magic) { Refuse(socket, writer, remote, $"not a DeepSeekCluster collective handshake (magic {magic:x8}, version {version})"); return; }
            var kind = (LinkKind)reader.ReadByte();
            string job = reader.ReadString();
            long generation = reader.ReadInt64();
            int world = reader.ReadInt32(), rank = reader.ReadInt32();
            // Version 1 sent these same fields and nothing after them: read whole, its refusal reaches it before the close.
            if (version != Version)
            {
                Refuse(socket, writer, remote, $"handshake version {version}; this group speaks version {Version}, which proves membership with the generation's link key");
                return;
            }
            var dialerNonce = LinkProof.ReadExactly(reader, LinkProof.NonceBytes);
            string? problem =
                job != JobId ? $"job '{job}' is not this group's job '{JobId}'"
                : generation != Generation ? $"generation {generation} does not match this group's generation {Generation} (a peer of another generation is fenced out)"
                : world != WorldSize ? $"world size {world} differs from this group's {WorldSize}"
                : rank < 0 || rank >= WorldSize || rank == Rank ? $"rank {rank} is not a peer rank of a world of {WorldSize}"
                : kind == LinkKind.Ring && rank != (Rank - 1 + WorldSize) % WorldSize ? $"rank {rank} is not rank {Rank}'s ring predecessor"
                : kind == LinkKind.PointToPoint && rank > Rank ? $"rank {rank} should wait for rank {Rank} to dial (the lower rank dials)"
                : kind is not (LinkKind.Ring or LinkKind.PointToPoint) ? $"unknown link kind {(byte)kind}"
                : LinkProof.Challenge(reader, writer, linkKey, Hello(kind, job, generation, world, rank), dialerNonce);
            if (problem is not null) { Refuse(socket, writer, remote, problem); return; }
            var slot = Slot(kind, rank);
            if (slot.Task.IsCompleted) { Refuse(socket, writer, remote, $"rank {rank} is already connected"); return; }
            LinkProof.Admit(writer);
            socket.ReceiveTimeout = socket.SendTimeout = 0;
            if (!slot.TrySetResult(socket)) socket.Dispose();
        }
        catch (Exception e) when (e is IOException or SocketException or EndOfStreamException or ObjectDisposedException)
        {
            // A connection that closes before saying anything is a port probe or a dial given up, not a refusal.
            if (hello) Refuse(socket, null, remote, $"the handshake broke off: {e.Message}");
            else socket.Dispose();
        }
    }

    void Refuse(Socket socket, BinaryWriter? writer, string remote, string reason)
    {
        Interlocked.Increment(ref refusedCount);
        LastRefusal = $"{remote}: {reason}";
        LinkRefusals.Record(LinkRefusals.Ring, remote, reason);
        try { if (writer is not null) LinkProof.Refuse(writer, reason); }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
        socket.Dispose();
    }

    /// <summary>The hello's fields before the dialer's nonce: what the dialer sends and what both proofs cover.</summary>
    internal static byte[] Hello(LinkKind kind, string job, long generation, int world, int rank) => LinkProof.Encode(w =>
    {
        w.Write(Magic); w.Write(Version); w.Write((byte)kind);
        w.Write(job); w.Write(generation); w.Write(world); w.Write(rank);
    });

    /// <summary>"host:port", "1.2.3.4:port" or "[::1]:port".</summary>
    internal static EndPoint ParseEndpoint(string text)
    {
        if (IPEndPoint.TryParse(text, out var ip) && text.Contains(':')) return ip;
        int colon = text.LastIndexOf(':');
        if (colon > 0 && int.TryParse(text.AsSpan(colon + 1), out int port) && port is >= 0 and <= 65535)
            return new DnsEndPoint(text[..colon], port);
        throw new ArgumentException($"endpoint '{text}' is not host:port");
    }

    public void Dispose()
    {
        stop.Cancel();
        listener.Dispose();
        foreach (var slot in incoming.Values)
            if (slot.Task.IsCompletedSuccessfully) slot.Task.Result.Dispose();
    }
}
