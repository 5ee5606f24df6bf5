// A point-to-point tcp link between adjacent pipeline stages of one replica: activations forward, their gradients back.
using System.Net;
using System.Net.Sockets;
using System.Runtime.ExceptionServices;
using System.Text;
using DeepSeekCluster.Training.Collectives;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// One connection to the neighbouring stage. Frames are an 8-byte little-endian payload length and the payload (a
/// tensor's bytes, or a vector of doubles). Every send and receive is bounded by the timeout: a neighbour that dies
/// (its socket closes or resets) or sends nothing for that long makes the call throw <see cref="CollectiveException"/>
/// naming it — "pipeline stage s (replica r, host:port)" — never hang. After a failure the link is faulted.
/// <see cref="Send"/> and <see cref="Receive(Tensor)"/> block. A 1F1B step has both ends of a link sending at once
/// (stage s sends micro-batch i + 1's activations down while stage s + 1 sends micro-batch i's gradient up): two blocking
/// sends whose frames exceed the socket buffers would each wait for the other to read, a deadlock until the timeout.
/// <see cref="SendAndReceive"/> is the exchange for that case: it sends on a thread of its own while the caller receives,
/// so neither end's send waits on its own receive.
/// </summary>
public sealed unsafe class StageLink : IDisposable
{
    internal const int Magic = 0x50505344; // "DSPP"
    internal const int Version = 2; // 2: the membership proof follows the hello

    public int OwnStage { get; }
    public int PeerStage { get; }
    public int Replica { get; }
    public string PeerAddress { get; }
    public string PeerName => $"pipeline stage {PeerStage} (replica {Replica}, {PeerAddress})";
    public TimeSpan Timeout { get; }
    /// <summary>Payload bytes sent and received, for the step's communication report.</summary>
    public long BytesMoved => Interlocked.Read(ref bytesMoved);

    /// <summary>What the links ask of the kernel for each socket buffer (Linux caps it at net.core.wmem_max / rmem_max).</summary>
    public const int DefaultBufferBytes = 4 << 20;

    readonly Socket socket;
    long bytesMoved;
    CollectiveException? fault;
    volatile bool disposed, sending;

    /// <summary>Whether a frame is being written now (tests wait for it before aborting a blocked exchange).</summary>
    internal bool SendInFlight => sending;

    internal StageLink(Socket socket, int ownStage, int peerStage, int replica, string peerAddress, TimeSpan timeout)
    {
        this.socket = socket;
        OwnStage = ownStage;
        PeerStage = peerStage;
        Replica = replica;
        PeerAddress = peerAddress;
        Timeout = timeout;
        socket.NoDelay = true;
        socket.SendTimeout = socket.ReceiveTimeout = (int)Math.Clamp(timeout.TotalMilliseconds, 1, int.MaxValue);
        socket.SendBufferSize = Math.Max(socket.SendBufferSize, DefaultBufferBytes);
        socket.ReceiveBufferSize = Math.Max(socket.ReceiveBufferSize, DefaultBufferBytes);
    }

    /// <summary>
    /// Shrinks both socket buffers to about <paramref name="bytes"/> (the kernel doubles it): tests use it so that a frame
    /// is far larger than everything the sockets can hold in flight. Far below 64 KiB, shrinking a connected socket's
    /// receive buffer makes loopback crawl (Linux prunes what the window already admitted and retransmits).
    /// </summary>
    internal void LimitBuffers(int bytes)
    {
        socket.SendBufferSize = bytes;
        socket.ReceiveBufferSize = bytes;
    }

    /// <summary>
    /// Dials the next stage at <paramref name="address"/> (retrying while it is not listening yet) and introduces this
    /// end: job, generation, own stage and replica. The acceptor refuses any other job, generation or position; then each
    /// end proves it holds the generation's <paramref name="linkKey"/> (<see cref="LinkProof"/>).
    /// </summary>
    public static StageLink Dial(string jobId, long generation, byte[] linkKey, int ownStage, int replica, string address, TimeSpan timeout)
    {
        linkKey = LinkProof.CheckKey(linkKey, nameof(linkKey));
        var deadline = DateTime.UtcNow + timeout;
        string name = $"pipeline stage {ownStage + 1} (replica {replica}, {address})";
        var socket = LinkSockets.DialProved(ParseEndpoint(address), deadline, CancellationToken.None, linkKey, Hello(jobId, generation, ownStage, replica),
            refused: (reason, impostor) =>
            {
                if (!impostor)
                    return new CollectiveException(CollectiveFailure.Refused,
                        $"{name} refused stage {ownStage} of job '{jobId}' generation {generation}: {reason}", ownStage + 1, address);
                LinkRefusals.Record(LinkRefusals.Stage, address, reason);
                return new CollectiveException(CollectiveFailure.Refused,
                    $"{name} is not a member of job '{jobId}' generation {generation}: {reason}", ownStage + 1, address);
            },
            stalled: last => new CollectiveException(CollectiveFailure.PeerStalled,
                $"{name} did not accept the link from stage {ownStage} within {timeout.TotalSeconds:0.#} s ({last?.Message ?? "no attempt"})", ownStage + 1, address, last));
        return new StageLink(socket, ownStage, ownStage + 1, replica, address, timeout);
    }

    /// <summary>The hello's fields before the dialer's nonce: what the dialer sends and what both proofs cover.</summary>
    internal static byte[] Hello(string jobId, long generation, int stage, int replica) => LinkProof.Encode(w =>
    {
        w.Write(Magic); w.Write(Version); w.Write(jobId); w.Write(generation); w.Write(stage); w.Write(replica);
    });

    // ---- Tensors ----

    /// <summary>Sends <paramref name="tensor"/>'s bytes (copied to a contiguous host tensor first when needed).</summary>
    public void Send(Tensor tensor)
    {
        using var scope = NewDisposeScope();
        var host = tensor.detach().cpu().contiguous();
        long bytes = host.numel() * host.element_size();
        SendFrame(bytes, (byte*)TensorMemory.DataPointer(host));
    }

    /// <summary>Receives one tensor frame into <paramref name="into"/> (host, contiguous), which fixes the expected size.</summary>
    public void Receive(Tensor into)
    {
        if (into.device_type != DeviceType.CPU || !into.is_contiguous())
            throw new ArgumentException("receive into a contiguous host tensor", nameof(into));
        long bytes = into.numel() * into.element_size();
        ReceiveFrame(bytes, (byte*)TensorMemory.DataPointer(into));
    }

    /// <summary>Receives a tensor of <paramref name="shape"/> and <paramref name="dtype"/> and moves it to <paramref name="device"/>.</summary>
    public Tensor Receive(long[] shape, ScalarType dtype, Device device)
    {
        var host = empty(shape, dtype: dtype);
        Receive(host);
        return device.type == DeviceType.CPU ? host : host.to(device);
    }

    /// <summary>
    /// Sends the frames of <paramref name="send"/> while receiving <paramref name="receiveCount"/> tensor frames of
    /// <paramref name="shape"/> and <paramref name="dtype"/> (moved to <paramref name="device"/>), for when the peer sends
    /// at the same time: the send runs on a thread of its own, so it never waits for this end's receive. Returns once
    /// both are done; the host copies being sent live until then. Each side is bounded by the timeout as
    /// <see cref="Send"/> and <see cref="Receive(Tensor)"/>; the first failure is thrown, naming the peer.
    /// </summary>
    public Tensor[] SendAndReceive(IReadOnlyList<Tensor> send, int receiveCount, long[] shape, ScalarType dtype, Device device)
    {
        ThrowIfFaulted();
        using var scope = NewDisposeScope();
        var hosts = send.Select(t => t.detach().cpu().contiguous()).ToList();
        var received = Enumerable.Range(0, receiveCount).Select(_ => empty(shape, dtype: dtype)).ToArray();
        Exception? sendError = null, receiveError = null;
        // A thread per exchange (tens of microseconds, against the milliseconds of a micro-batch's compute), not a
        // long-lived sender: nothing can be left waiting on a handoff when an abort closes the link mid-exchange.
        var sender = new Thread(() =>
        {
            try
            {
                foreach (var h in hosts) SendFrame(h.numel() * h.element_size(), (byte*)TensorMemory.DataPointer(h));
            }
            catch (Exception e) { sendError = e; }
        }) { IsBackground = true, Name = $"send to pipeline stage {PeerStage}" };
        sender.Start();
        try
        {
            foreach (var r in received) Receive(r);
        }
        catch (Exception e) { receiveError = e; }
        sender.Join(); // bounded: the send times out, fails with the link, or ends when an abort shuts the socket down
        if (receiveError is not null || sendError is not null)
        {
            // The link's first failure is the cause; the other side then failed on the faulted or closed link.
            var first = ReferenceEquals(sendError, fault) ? sendError! : receiveError ?? sendError!;
            ExceptionDispatchInfo.Capture(first).Throw();
        }
        return received.Select(r => (device.type == DeviceType.CPU ? r : r.to(device)).MoveToOuterDisposeScope()).ToArray();
    }

    // ---- Small vectors (scalars between stages) ----

    public void SendValues(double[] values)
    {
        fixed (double* p = values) SendFrame(values.LongLength * sizeof(double), (byte*)p, allowEmpty: true);
    }

    public double[] ReceiveValues()
    {
        long bytes = ReceiveHeader();
        if (bytes % sizeof(double) != 0 || bytes > (64L << 20))
            throw Fail(CollectiveFailure.Protocol, $"{PeerName} sent a value frame of {bytes} bytes; expected a multiple of 8 below 64 MiB");
        var values = new double[bytes / sizeof(double)];
        fixed (double* p = values) ReceivePayload(bytes, (byte*)p);
        return values;
    }

    // ---- Framing ----

    void SendFrame(long bytes, byte* data, bool allowEmpty = false)
    {
        ThrowIfFaulted();
        if (bytes == 0 && !allowEmpty) throw new ArgumentException("an empty tensor frame");
        long header = bytes;
        sending = true;
        try
        {
            Write((byte*)&header, sizeof(long), "send to");
            Write(data, bytes, "send to");
        }
        finally { sending = false; }
        Interlocked.Add(ref bytesMoved, bytes);
    }

    void ReceiveFrame(long expected, byte* data)
    {
        long bytes = ReceiveHeader();
        if (bytes != expected)
            throw Fail(CollectiveFailure.Protocol, $"{PeerName} sent a tensor of {bytes} bytes; stage {OwnStage} expected {expected} (the stages disagree on the micro-batch shape)");
        ReceivePayload(bytes, data);
    }

    long ReceiveHeader()
    {
        ThrowIfFaulted();
        long header;
        Read((byte*)&header, sizeof(long));
        return header;
    }

    void ReceivePayload(long bytes, byte* data)
    {
        Read(data, bytes);
        Interlocked.Add(ref bytesMoved, bytes);
    }

    void Write(byte* data, long count, string verb)
    {
        try
        {
            while (count > 0)
            {
                int n = socket.Send(new ReadOnlySpan<byte>(data, (int)Math.Min(count, 1 << 30)));
                data += n;
                count -= n;
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            throw Translate(e, $"could not {verb} {PeerName}");
        }
    }

    void Read(byte* data, long count)
    {
        try
        {
            while (count > 0)
            {
                int n = socket.Receive(new Span<byte>(data, (int)Math.Min(count, 1 << 30)));
                // Our own Dispose (a run's abort) shuts the socket down under a blocked receive, which then reads 0 bytes too.
                if (n == 0) throw disposed ? Fail(CollectiveFailure.Unavailable, $"receiving from {PeerName}: the link was closed on this side (aborted)")
                                           : Fail(CollectiveFailure.PeerLost, $"{PeerName} closed the pipeline link (its process ended or it failed)");
                data += n;
                count -= n;
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            throw Translate(e, $"receiving from {PeerName} failed");
        }
    }

    CollectiveException Translate(Exception e, string what)
    {
        if (disposed) return Fail(CollectiveFailure.Unavailable, $"{what}: the link was closed on this side (aborted)", e);
        return e is SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock }
            ? Fail(CollectiveFailure.PeerStalled, $"{PeerName} sent or accepted nothing within {Timeout.TotalSeconds:0.#} s ({what})", e)
            : Fail(CollectiveFailure.PeerLost, $"{what}: {e.Message}", e);
    }

    CollectiveException Fail(CollectiveFailure failure, string message, Exception? inner = null)
    {
        var error = new CollectiveException(failure, message, PeerStage, PeerAddress, inner);
        Interlocked.CompareExchange(ref fault, error, null); // the send of an exchange may fail beside its receive
        return error;
    }

    void ThrowIfFaulted()
    {
        if (fault is not null) throw new CollectiveException(fault.Failure, $"the link to {PeerName} already failed: {fault.Message}", PeerStage, PeerAddress, fault);
        if (disposed) throw new CollectiveException(CollectiveFailure.Unavailable, $"the link to {PeerName} is closed", PeerStage, PeerAddress);
    }

    internal static EndPoint ParseEndpoint(string text)
    {
        int colon = text.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(text.AsSpan(colon + 1), out int port) || port is < 1 or > 65535)
            throw new ArgumentException($"pipeline endpoint '{text}': expected host:port");
        var host = text[..colon].Trim('[', ']');
        return IPAddress.TryParse(host, out var ip) ? new IPEndPoint(ip, port) : new DnsEndPoint(host, port);
    }

    /// <summary>Closes the connection; a call blocked on it fails at once (this is how a run aborts its pipeline).</summary>
    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        try { socket.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
        socket.Dispose();
    }
}
