// The membership proof of a data-plane link (ring and pipeline): an HMAC-SHA256 challenge–response both ways. Not encryption.
using System.Security.Cryptography;
using System.Text;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// Knowing a job id and a generation (both public on <c>GET /jobs</c>) is not membership; holding the generation's link
/// key (32 random bytes the Coordinator makes at each formation and hands out on the authenticated control stream) is.
/// After the dialer's hello (its fields and a fresh nonce) passes the listener's checks, the listener answers with a
/// fresh nonce of its own and an HMAC over (role, hello, both nonces); the dialer checks it, so an outsider cannot pose
/// as the listener, and answers with its own HMAC over the same, so an outsider cannot join. Each side's nonce is
/// fresh, so a recorded handshake replayed later fails; the role label keeps a listener's HMAC from serving as a
/// dialer's. The key never travels. The traffic after the handshake is neither encrypted nor authenticated
/// (docs/decisions.md says why).
/// </summary>
internal static class LinkProof
{
    public const int MinKeyBytes = 16, NonceBytes = 32, MacBytes = 32;

    internal const string ListenerRole = "deepseek-cluster link listener v1", DialerRole = "deepseek-cluster link dialer v1";

    /// <summary>A private copy of <paramref name="key"/>, or a clear error naming the parameter.</summary>
    public static byte[] CheckKey(byte[]? key, string parameter)
    {
        if (key is null || key.Length < MinKeyBytes)
            throw new ArgumentException($"the link key must be at least {MinKeyBytes} bytes (the coordinator hands out 32 per generation in the assignment); got {key?.Length ?? 0}", parameter);
        return key.ToArray();
    }

    public static byte[] Nonce() => RandomNumberGenerator.GetBytes(NonceBytes);

    /// <summary>The hello's fields as bytes, identically on both ends: what both HMACs cover besides the nonces.</summary>
    public static byte[] Encode(Action<BinaryWriter> fields)
    {
        using var buffer = new MemoryStream();
        using (var writer = new BinaryWriter(buffer, Encoding.UTF8, leaveOpen: true)) fields(writer);
        return buffer.ToArray();
    }

    /// <summary>
    /// The dialer's side, from its hello to the listener's verdict: sends the hello and a nonce, checks the listener's proof,
    /// sends its own. Returns null when admitted, else why not; <paramref name="listenerUnproven"/> tells a refusal by a
    /// member (its reason) from a listener that could not prove membership (it is not one).
    /// </summary>
    public static string? Dial(BinaryReader reader, BinaryWriter writer, byte[] key, byte[] hello, out bool listenerUnproven)
    {
        listenerUnproven = false;
        var dialerNonce = Nonce();
        writer.Write(hello);
        writer.Write(dialerNonce);
        writer.Flush();
        if (!reader.ReadBoolean()) return reader.ReadString();
        var listenerNonce = ReadExactly(reader, NonceBytes);
        var listenerMac = ReadExactly(reader, MacBytes);
        if (!CryptographicOperations.FixedTimeEquals(listenerMac, Mac(key, ListenerRole, hello, dialerNonce, listenerNonce)))
        {
            listenerUnproven = true;
            return "the listener could not prove it holds this generation's link key: it is not a member";
        }
        writer.Write(Mac(key, DialerRole, hello, dialerNonce, listenerNonce));
        writer.Flush();
        bool admitted = reader.ReadBoolean();
        string reason = reader.ReadString();
        return admitted ? null : reason;
    }

    /// <summary>
    /// The listener's side once the hello's fields passed its checks: reads the dialer's nonce, sends its own with its
    /// proof and checks the dialer's. Returns null when the dialer proved membership, else why not. The caller sends the
    /// verdict (<see cref="Admit"/> or its own refusal).
    /// </summary>
    public static string? Challenge(BinaryReader reader, BinaryWriter writer, byte[] key, byte[] hello, byte[] dialerNonce)
    {
        var listenerNonce = Nonce();
        writer.Write(true);
        writer.Write(listenerNonce);
        writer.Write(Mac(key, ListenerRole, hello, dialerNonce, listenerNonce));
        writer.Flush();
        var dialerMac = reader.ReadBytes(MacBytes);
        if (dialerMac.Length < MacBytes) return "closed the connection before proving membership (no link key)";
        return CryptographicOperations.FixedTimeEquals(dialerMac, Mac(key, DialerRole, hello, dialerNonce, listenerNonce))
            ? null
            : "did not prove membership: its HMAC over this connection's challenge does not match the generation's link key (a wrong key, or a replayed handshake)";
    }

    public static void Admit(BinaryWriter writer)
    {
        writer.Write(true);
        writer.Write("");
        writer.Flush();
    }

    public static void Refuse(BinaryWriter writer, string reason)
    {
        writer.Write(false);
        writer.Write(reason);
        writer.Flush();
    }

    public static byte[] ReadExactly(BinaryReader reader, int count)
    {
        var bytes = reader.ReadBytes(count);
        if (bytes.Length < count) throw new EndOfStreamException($"the peer closed the connection {bytes.Length} bytes into a {count}-byte handshake field");
        return bytes;
    }

    internal static byte[] Mac(byte[] key, string role, byte[] hello, byte[] dialerNonce, byte[] listenerNonce)
    {
        using var hmac = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, key);
        hmac.AppendData(Encoding.ASCII.GetBytes(role));
        hmac.AppendData(hello);
        hmac.AppendData(dialerNonce);
        hmac.AppendData(listenerNonce);
        return hmac.GetHashAndReset();
    }
}
