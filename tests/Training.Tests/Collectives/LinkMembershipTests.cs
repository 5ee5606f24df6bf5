// The data plane's membership proof over real loopback sockets: on the ring and on the pipeline stage links, a peer
// with the generation's key joins; one with a wrong key, with no key, or replaying a recorded handshake is refused,
// logged (the LinkRefusals event) and counted (deepseek.worker.link_refusals), and the real members still link up.
using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Pipeline;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public sealed class LinkMembershipTests : IDisposable
{
    static readonly TcpCollectiveOptions Options = new() { Timeout = TimeSpan.FromSeconds(10) };
    readonly byte[] key = RandomNumberGenerator.GetBytes(32);
    readonly byte[] wrongKey = RandomNumberGenerator.GetBytes(32);
    readonly ConcurrentQueue<LinkRefusal> logged = new();
    readonly ConcurrentDictionary<string, long> counted = new();
    readonly SemaphoreSlim arrived = new(0);
    readonly MeterListener meter = new();

    public LinkMembershipTests()
    {
        LinkRefusals.Refused += Logged;
        meter.InstrumentPublished = (instrument, listener) =>
        {
            if (instrument.Meter.Name == LinkRefusals.MeterName) listener.EnableMeasurementEvents(instrument);
        };
        meter.SetMeasurementEventCallback<long>((_, value, tags, _) =>
        {
            foreach (var tag in tags)
                if (tag.Key == "link") counted.AddOrUpdate((string)tag.Value!, value, (_, v) => v + value);
        });
        meter.Start();
    }

    public void Dispose()
    {
        LinkRefusals.Refused -= Logged;
        meter.Dispose();
    }

    void Logged(LinkRefusal refusal)
    {
        logged.Enqueue(refusal);
        arrived.Release();
    }

    /// <summary>The first refusal announced that matches (the refusing end may finish after the dialer gave up).</summary>
    async Task<LinkRefusal> RefusalAsync(Func<LinkRefusal, bool> match)
    {
        while (true)
        {
            if (logged.FirstOrDefault(match) is { } found) return found;
            Assert.True(await arrived.WaitAsync(TimeSpan.FromSeconds(10)), "no matching refusal was announced within 10 s");
        }
    }

    // ---- The ring ----

    [Fact]
    public async Task ARingRefusesPeersWithAWrongKeyOrNoKeyCountsThemAndStillForms()
    {
        using var rank0 = new TcpRendezvous("job", 7, key, 0, 2, new(IPAddress.Loopback, 0));
        using var rank1 = new TcpRendezvous("job", 7, key, 1, 2, new(IPAddress.Loopback, 0));
        var endpoints = new[] { $"127.0.0.1:{rank0.LocalEndpoint.Port}", $"127.0.0.1:{rank1.LocalEndpoint.Port}" };

        // An outsider that read the job and generation from GET /jobs and holds another key, posing as rank 0: it sees
        // that rank 1 proves a key it does not share and hangs up before proving anything.
        using (var outsider = new TcpRendezvous("job", 7, wrongKey, 0, 2, new(IPAddress.Loopback, 0)))
        {
            var e = Assert.Throws<CollectiveException>(() => outsider.Connect([$"127.0.0.1:{outsider.LocalEndpoint.Port}", endpoints[1]], Options));
            Assert.Equal(CollectiveFailure.Refused, e.Failure);
            Assert.Contains("could not prove it holds this generation's link key", e.Message);
        }
        await RefusalAsync(r => r.Link == LinkRefusals.Ring && r.Reason.Contains("closed the connection before proving membership"));
        Assert.Contains("closed the connection before proving membership", rank1.LastRefusal);

        // An outsider that answers the challenge with an HMAC under its own key.
        var hello = TcpRendezvous.Hello(LinkKind.Ring, "job", 7, 2, 0);
        var (reason, remote) = await AnswerChallenge(rank1.LocalEndpoint, hello, (dialer, listener) => LinkProof.Mac(wrongKey, LinkProof.DialerRole, hello, dialer, listener));
        Assert.Contains("did not prove membership", reason);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Ring && r.Remote == remote && r.Reason.Contains("did not prove membership"));

        // A peer without a key at all: the handshake of before the proof (version 1) is refused by its version.
        using (var old = await Connected(rank1.LocalEndpoint))
        {
            var writer = new BinaryWriter(old.Stream, Encoding.UTF8);
            writer.Write(0x43435344); writer.Write(1); writer.Write((byte)LinkKind.Ring); writer.Write("job"); writer.Write(7L); writer.Write(2); writer.Write(0);
            writer.Flush();
            var reader = new BinaryReader(old.Stream, Encoding.UTF8);
            Assert.False(reader.ReadBoolean());
            Assert.Contains("handshake version 1; this group speaks version 2", reader.ReadString());
        }
        Assert.Equal(3, rank1.RefusedCount);
        Assert.True(counted.GetValueOrDefault(LinkRefusals.Ring) >= 3, $"{counted.GetValueOrDefault(LinkRefusals.Ring)} ring refusals counted");

        // The members, holding the key, form the ring and reduce.
        var sums = await Task.WhenAll(new[] { rank0, rank1 }.Select(rv => Task.Run(() =>
        {
            using var c = rv.Connect(endpoints, Options);
            using var t = ones(5) * (c.Rank + 1);
            c.AllReduce(t);
            return t.sum().item<float>();
        }))).WaitAsync(TimeSpan.FromSeconds(30));
        Assert.All(sums, sum => Assert.Equal(15f, sum));
    }

    [Fact]
    public void ARingMemberRefusesAListenerThatCannotProveTheKey()
    {
        using var member = new TcpRendezvous("job", 7, key, 0, 2, new(IPAddress.Loopback, 0));
        using var impostor = new TcpRendezvous("job", 7, wrongKey, 1, 2, new(IPAddress.Loopback, 0)); // squats on rank 1's address
        string impostorAddress = $"127.0.0.1:{impostor.LocalEndpoint.Port}";
        long before = counted.GetValueOrDefault(LinkRefusals.Ring);

        var e = Assert.Throws<CollectiveException>(() => member.Connect([$"127.0.0.1:{member.LocalEndpoint.Port}", impostorAddress], Options));

        Assert.Equal(CollectiveFailure.Refused, e.Failure);
        Assert.Equal(1, e.PeerRank);
        Assert.Contains($"rank 1 ({impostorAddress}) is not a member of job 'job' generation 7", e.Message);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Ring && r.Remote == impostorAddress && r.Reason.Contains("could not prove"));
        Assert.True(counted.GetValueOrDefault(LinkRefusals.Ring) > before);
    }

    [Fact]
    public async Task ARingRefusesAReplayedHandshake()
    {
        using var rank1 = new TcpRendezvous("job", 7, key, 1, 2, new(IPAddress.Loopback, 0));
        var hello = TcpRendezvous.Hello(LinkKind.Ring, "job", 7, 2, 0);

        // A member's real handshake, recorded on the wire, is admitted...
        byte[] transcript;
        using (var member = await Connected(rank1.LocalEndpoint))
        {
            var recorder = new RecordingStream(member.Stream);
            Assert.Null(LinkProof.Dial(new BinaryReader(member.Stream, Encoding.UTF8), new BinaryWriter(recorder, Encoding.UTF8), key, hello, out _));
            transcript = recorder.Written.ToArray();
        }
        // ...and the same bytes sent again meet a fresh challenge that the old HMAC does not answer.
        var (reason, remote) = await Replay(rank1.LocalEndpoint, transcript);
        Assert.Contains("did not prove membership", reason);
        Assert.Contains("replayed handshake", reason);
        Assert.Equal(1, rank1.RefusedCount);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Ring && r.Remote == remote);
    }

    // ---- The stage links ----

    [Fact]
    public async Task AStageListenerRefusesPeersWithAWrongKeyOrNoKeyCountsThemAndTheRealStageStillLinks()
    {
        using var listener = new StageListener("job", 7, key, stage: 1, replica: 0, new IPEndPoint(IPAddress.Loopback, 0));
        string address = $"127.0.0.1:{listener.LocalEndpoint.Port}";
        long before = counted.GetValueOrDefault(LinkRefusals.Stage);
        var accepting = Task.Factory.StartNew(() => listener.Accept("127.0.0.1:1", TimeSpan.FromSeconds(30)), TaskCreationOptions.LongRunning);

        var e = Assert.Throws<CollectiveException>(() => StageLink.Dial("job", 7, wrongKey, ownStage: 0, replica: 0, address, TimeSpan.FromSeconds(10)));
        Assert.Equal(CollectiveFailure.Refused, e.Failure);
        Assert.Contains($"pipeline stage 1 (replica 0, {address}) is not a member of job 'job' generation 7", e.Message);

        var hello = StageLink.Hello("job", 7, 0, 0);
        var (reason, remote) = await AnswerChallenge(listener.LocalEndpoint, hello, (dialer, listenerNonce) => LinkProof.Mac(wrongKey, LinkProof.DialerRole, hello, dialer, listenerNonce));
        Assert.Contains("did not prove membership", reason);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Stage && r.Remote == remote);
        Assert.Contains(remote, listener.LastRefusal);

        using (var old = await Connected(listener.LocalEndpoint))
        {
            var writer = new BinaryWriter(old.Stream, Encoding.UTF8);
            writer.Write(0x50505344); writer.Write(1); writer.Write("job"); writer.Write(7L); writer.Write(0); writer.Write(0);
            writer.Flush();
            var reader = new BinaryReader(old.Stream, Encoding.UTF8);
            Assert.False(reader.ReadBoolean());
            Assert.Contains("pipeline link version 1; this stage speaks version 2", reader.ReadString());
        }

        // The real stage 0 holds the key: the link forms and carries values.
        using var next = StageLink.Dial("job", 7, key, ownStage: 0, replica: 0, address, TimeSpan.FromSeconds(10));
        using var previous = await accepting.WaitAsync(TimeSpan.FromSeconds(30));
        next.SendValues([1.5, -2]);
        Assert.Equal([1.5, -2], previous.ReceiveValues());
        Assert.True(counted.GetValueOrDefault(LinkRefusals.Stage) - before >= 3, $"{counted.GetValueOrDefault(LinkRefusals.Stage) - before} stage refusals counted");
    }

    [Fact]
    public async Task AStageListenerRefusesAReplayedHandshakeAndADialerRefusesAListenerWithoutTheKey()
    {
        using var listener = new StageListener("job", 7, key, stage: 1, replica: 0, new IPEndPoint(IPAddress.Loopback, 0));
        var accepting = Task.Factory.StartNew(() => listener.Accept("127.0.0.1:1", TimeSpan.FromSeconds(30)), TaskCreationOptions.LongRunning);
        var hello = StageLink.Hello("job", 7, 0, 0);
        byte[] transcript;
        using (var member = await Connected(listener.LocalEndpoint))
        {
            var recorder = new RecordingStream(member.Stream);
            Assert.Null(LinkProof.Dial(new BinaryReader(member.Stream, Encoding.UTF8), new BinaryWriter(recorder, Encoding.UTF8), key, hello, out _));
            transcript = recorder.Written.ToArray();
            (await accepting.WaitAsync(TimeSpan.FromSeconds(30))).Dispose();
        }
        accepting = Task.Factory.StartNew(() => listener.Accept("127.0.0.1:1", TimeSpan.FromSeconds(30)), TaskCreationOptions.LongRunning);
        var (reason, remote) = await Replay(listener.LocalEndpoint, transcript);
        Assert.Contains("did not prove membership", reason);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Stage && r.Remote == remote);
        listener.Dispose(); // ends the wait for a real stage 0
        Assert.Equal(CollectiveFailure.Unavailable, (await Assert.ThrowsAsync<CollectiveException>(() => accepting)).Failure);

        using var impostor = new StageListener("job", 7, wrongKey, stage: 1, replica: 0, new IPEndPoint(IPAddress.Loopback, 0));
        string impostorAddress = $"127.0.0.1:{impostor.LocalEndpoint.Port}";
        var impostorAccepting = Task.Factory.StartNew(() => impostor.Accept("127.0.0.1:1", TimeSpan.FromSeconds(3)), TaskCreationOptions.LongRunning);
        var e = Assert.Throws<CollectiveException>(() => StageLink.Dial("job", 7, key, ownStage: 0, replica: 0, impostorAddress, TimeSpan.FromSeconds(10)));
        Assert.Contains("could not prove it holds this generation's link key", e.Message);
        Assert.Contains(logged, r => r.Link == LinkRefusals.Stage && r.Remote == impostorAddress);
        impostor.Dispose();
        await Assert.ThrowsAsync<CollectiveException>(() => impostorAccepting);
    }

    [Fact]
    public void AKeyShorterThan16BytesIsRefusedNamingTheParameter()
    {
        var e = Assert.Throws<ArgumentException>(() => new TcpRendezvous("job", 1, new byte[8], 0, 1));
        Assert.Equal("linkKey", e.ParamName);
        Assert.Contains("got 8", e.Message);
        Assert.Throws<ArgumentException>(() => new StageListener("job", 1, [], 1, 0));
    }

    // ---- Raw peers ----

    sealed record Peer(TcpClient Client, NetworkStream Stream) : IDisposable
    {
        public string Local => ((IPEndPoint)Client.Client.LocalEndPoint!).ToString();
        public void Dispose() => Client.Dispose();
    }

    static async Task<Peer> Connected(IPEndPoint listener)
    {
        var client = new TcpClient(AddressFamily.InterNetwork);
        await client.ConnectAsync(IPAddress.Loopback, listener.Port);
        client.ReceiveTimeout = client.SendTimeout = 10_000;
        return new Peer(client, client.GetStream());
    }

    /// <summary>Sends a hello, reads the listener's challenge, answers with <paramref name="answer"/>; returns the refusal and our address.</summary>
    static async Task<(string Reason, string Remote)> AnswerChallenge(IPEndPoint listener, byte[] hello, Func<byte[], byte[], byte[]> answer)
    {
        using var peer = await Connected(listener);
        var writer = new BinaryWriter(peer.Stream, Encoding.UTF8);
        var reader = new BinaryReader(peer.Stream, Encoding.UTF8);
        var nonce = LinkProof.Nonce();
        writer.Write(hello); writer.Write(nonce); writer.Flush();
        Assert.True(reader.ReadBoolean()); // the fields are right: the challenge follows
        var listenerNonce = reader.ReadBytes(LinkProof.NonceBytes);
        reader.ReadBytes(LinkProof.MacBytes);
        writer.Write(answer(nonce, listenerNonce)); writer.Flush();
        Assert.False(reader.ReadBoolean());
        return (reader.ReadString(), peer.Local);
    }

    static async Task<(string Reason, string Remote)> Replay(IPEndPoint listener, byte[] transcript)
    {
        using var peer = await Connected(listener);
        await peer.Stream.WriteAsync(transcript);
        var reader = new BinaryReader(peer.Stream, Encoding.UTF8);
        Assert.True(reader.ReadBoolean());
        reader.ReadBytes(LinkProof.NonceBytes + LinkProof.MacBytes); // a fresh challenge: the recorded answer is to another one
        Assert.False(reader.ReadBoolean());
        return (reader.ReadString(), peer.Local);
    }

    /// <summary>Passes everything through to the socket and keeps a copy of what was written: a wire recording.</summary>
    sealed class RecordingStream(Stream inner) : Stream
    {
        public MemoryStream Written { get; } = new();
        public override void Write(byte[] buffer, int offset, int count) { Written.Write(buffer, offset, count); inner.Write(buffer, offset, count); }
        public override void Write(ReadOnlySpan<byte> buffer) { Written.Write(buffer); inner.Write(buffer); }
        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    }
}
