// A cluster CA with a server and a client certificate, and another CA with a client of its own, made at test time and
// written as PEM files (the shape a Kubernetes TLS Secret mounts: tls.crt, tls.key, ca.crt).
using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using DeepSeekCluster.ServiceDefaults;

namespace DeepSeekCluster.Tests.Shared;

/// <summary>The server certificate names localhost and 127.0.0.1 and allows server and client authentication; the client certificates client authentication only.</summary>
public sealed record TestPki(string Folder, string Ca, string ServerCertificate, string ServerKey, string ClientCertificate, string ClientKey,
    string OtherCa, string StrangerCertificate, string StrangerKey)
{
    public static TestPki Create()
    {
        string folder = Directory.CreateTempSubdirectory("cluster-pki-").FullName;
        var ca = Authority("deepseek test cluster CA");
        var other = Authority("some other CA");
        string Write(string name, string pem) { string path = Path.Combine(folder, name); File.WriteAllText(path, pem); return path; }
        var (server, serverKey) = Issue(ca, "coordinator", server: true);
        var (client, clientKey) = Issue(ca, "worker-0", server: false);
        var (stranger, strangerKey) = Issue(other, "stranger", server: false);
        return new TestPki(folder, Write("ca.crt", ca.ExportCertificatePem()),
            Write("server.crt", server.ExportCertificatePem()), Write("server.key", serverKey.ExportPkcs8PrivateKeyPem()),
            Write("client.crt", client.ExportCertificatePem()), Write("client.key", clientKey.ExportPkcs8PrivateKeyPem()),
            Write("other-ca.crt", other.ExportCertificatePem()),
            Write("stranger.crt", stranger.ExportCertificatePem()), Write("stranger.key", strangerKey.ExportPkcs8PrivateKeyPem()));
    }

    /// <summary>Cluster:Tls:* of a server: its certificate and key (the server's unless given) and the CA.</summary>
    public Dictionary<string, string?> Settings(string? certificate = null, string? key = null, string? ca = null) => new()
    {
        [ClusterTls.CertificatePathKey] = certificate ?? ServerCertificate,
        [ClusterTls.KeyPathKey] = key ?? ServerKey,
        [ClusterTls.CaPathKey] = ca ?? Ca,
    };

    /// <summary>What a worker of this cluster loads (its client certificate, the cluster CA).</summary>
    public ClusterTls Member() => ClusterTls.Load(ClientCertificate, ClientKey, Ca)!;

    /// <summary>A client of another cluster: its certificate is of <see cref="OtherCa"/>, and it trusts only that CA.</summary>
    public ClusterTls Stranger() => ClusterTls.Load(StrangerCertificate, StrangerKey, OtherCa)!;

    /// <summary>The lines of every private key file: none may ever be in a log.</summary>
    public IEnumerable<string> KeyMaterial() => new[] { ServerKey, ClientKey, StrangerKey }
        .SelectMany(File.ReadAllLines).Where(l => !l.StartsWith("-----", StringComparison.Ordinal)).Append("PRIVATE KEY");

    /// <summary>A self-signed CA certificate, with its private key.</summary>
    static X509Certificate2 Authority(string name)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        return request.CreateSelfSigned(DateTimeOffset.UtcNow.AddHours(-2), DateTimeOffset.UtcNow.AddDays(2));
    }

    static (X509Certificate2, ECDsa) Issue(X509Certificate2 ca, string name, bool server)
    {
        var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
        // The server certificate is a client one too, as the Coordinator's (it commits into CheckpointStore).
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
            server ? [new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")] : [new Oid("1.3.6.1.5.5.7.3.2")], false));
        request.CertificateExtensions.Add(X509AuthorityKeyIdentifierExtension.CreateFromCertificate(ca, true, false));
        if (server)
        {
            var names = new SubjectAlternativeNameBuilder();
            names.AddDnsName("localhost");
            names.AddIpAddress(IPAddress.Loopback);
            request.CertificateExtensions.Add(names.Build());
        }
        var certificate = request.Create(ca, DateTimeOffset.UtcNow.AddHours(-1), DateTimeOffset.UtcNow.AddDays(1), RandomNumberGenerator.GetBytes(16));
        return (certificate, key);
    }
}
