// Where a pipeline stage waits for the link from the stage before it; the handshake fences other jobs, generations and positions.
using System.Net;
using System.Net.Sockets;
using System.Text;
using DeepSeekCluster.Training.Collectives;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// Bind first (port 0 picks one), publish <see cref="LocalEndpoint"/>, then <see cref="Accept"/> the previous stage.
/// A connection whose handshake names another job, another generation, or a dialer that is not stage − 1 of the same
/// replica is refused with the reason and the wait goes on, so a zombie of an older generation can never feed a stage.
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

    public StageListener(string jobId, long generation, int stage, int replica, IPEndPoint? bind = null)
    {
        if (stage < 0) throw new ArgumentOutOfRangeException(nameof(stage), stage, "stage must be >= 0");
        JobId = jobId;
        Generation = generation;
        Stage = stage;
        Replica = replica;
        bind ??= new IPEndPoint(IPAddress.Any, 0);
        listener = new Socket(bind.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        listener.Bind(bind);
        listener.Listen(16);
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
                using var cts = new CancellationTokenSource(StageLink.Remaining(deadline));
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
        try
        {
            socket.ReceiveTimeout = socket.SendTimeout = (int)Math.Max(1, StageLink.Remaining(deadline).TotalMilliseconds);
            string remote = socket.RemoteEndPoint?.ToString() ?? "unknown";
            using var stream = new NetworkStream(socket, ownsSocket: false);
            using var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true);
            using var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            int magic = reader.ReadInt32(), version = reader.ReadInt32();
            string? reason = null;
            string job = ""; long generation = 0; int stage = -1, replica = -1;
            if (magic != StageLink.Magic || version != StageLink.Version) reason = $"not a pipeline link (magic {magic:x8}, version {version})";
            else
            {
                job = reader.ReadString(); generation = reader.ReadInt64(); stage = reader.ReadInt32(); replica = reader.ReadInt32();
                if (job != JobId) reason = $"job '{job}' is not this stage's job '{JobId}'";
                else if (generation != Generation) reason = $"generation {generation} is not this stage's generation {Generation}";
                else if (stage != Stage - 1 || replica != Replica)
                    reason = $"stage {stage} replica {replica} is not stage {Stage - 1} replica {Replica}, the only one that feeds stage {Stage}";
            }
            if (reason is not null && magic == StageLink.Magic)
            {
                writer.Write(false); writer.Write(reason); writer.Flush();
            }
            if (reason is not null)
            {
                LastRefusal = $"{remote}: {reason}";
                socket.Dispose();
                return null;
            }
            writer.Write(true); writer.Write(""); writer.Flush();
            return new StageLink(socket, Stage, Stage - 1, Replica, peerAddress, timeout);
        }
        catch (Exception e) when (e is SocketException or IOException or EndOfStreamException)
        {
            LastRefusal = $"handshake failed: {e.Message}";
            socket.Dispose();
            return null;
        }
    }

    public void Dispose() => listener.Dispose();
}
