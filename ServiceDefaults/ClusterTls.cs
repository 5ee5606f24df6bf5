// Mutual TLS between cluster members: this process's certificate and key, and the cluster CA that every peer's
// certificate must chain to. PEM files, the shape a Kubernetes TLS Secret mounts (tls.crt, tls.key, ca.crt). Peers are
// checked against that CA alone (a custom trust store), never the machine's roots: a certificate from a public CA is
// not a member. Nothing here logs or returns key material.
using System.Net.Security;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace DeepSeekCluster.ServiceDefaults;

public sealed class ClusterTls
{
    /// <summary>This process's certificate (PEM; a chain after it is sent to peers as intermediates).</summary>
    public const string CertificatePathKey = "Cluster:Tls:CertificatePath";
    /// <summary>The private key of that certificate (PEM, PKCS#8, PKCS#1 or SEC1; unencrypted).</summary>
    public const string KeyPathKey = "Cluster:Tls:KeyPath";
    /// <summary>The cluster CA (PEM; several certificates are all trusted): the only roots peers may chain to.</summary>
    public const string CaPathKey = "Cluster:Tls:CaPath";

    /// <summary>Values of the refusal reason: no certificate presented, or one that does not chain to the cluster CA.</summary>
    public const string Missing = "missing", Untrusted = "untrusted";

    static readonly Oid ServerAuthentication = new("1.3.6.1.5.5.7.3.1", "Server Authentication");
    static readonly Oid ClientAuthentication = new("1.3.6.1.5.5.7.3.2", "Client Authentication");

    readonly X509Certificate2Collection _authorities;

    ClusterTls(X509Certificate2 certificate, X509Certificate2Collection intermediates, X509Certificate2Collection authorities)
    {
        Certificate = certificate;
        _authorities = authorities;
        CertificateContext = SslStreamCertificateContext.Create(certificate, intermediates, offline: true);
    }

    /// <summary>This process's certificate, with its private key.</summary>
    public X509Certificate2 Certificate { get; }

    /// <summary>The certificate and its intermediates, as TLS sends them (built once: building it per connection is costly).</summary>
    public SslStreamCertificateContext CertificateContext { get; }

    /// <summary>
    /// Null when none of the three paths is set: no mutual TLS, as without certificates. Otherwise all three must name
    /// readable PEM files, the key must belong to the certificate and the certificate must chain to the CA; every
    /// failure is an <see cref="ArgumentException"/> naming the setting and its path. <paramref name="nameOf"/> turns
    /// a key (Cluster:Tls:CaPath) into the name the process reads it by (Cluster__Tls__CaPath for an environment variable).
    /// </summary>
    public static ClusterTls? Load(string? certificatePath, string? keyPath, string? caPath, Func<string, string>? nameOf = null)
    {
        nameOf ??= key => key;
        (string Key, string? Path)[] settings = [(CertificatePathKey, certificatePath), (KeyPathKey, keyPath), (CaPathKey, caPath)];
        var set = settings.Where(s => !string.IsNullOrWhiteSpace(s.Path)).ToList();
        if (set.Count == 0) return null;
        if (set.Count < settings.Length)
            throw new ArgumentException($"mutual TLS is half configured: {string.Join(", ", set.Select(s => $"{nameOf(s.Key)}='{s.Path}'"))} " +
                $"set but {string.Join(", ", settings.Except(set).Select(s => nameOf(s.Key)))} not; set all three (PEM files) or none");
        foreach (var (key, path) in settings)
            if (!File.Exists(path))
                throw new ArgumentException($"{nameOf(key)}='{path}': no such file" + (Directory.Exists(path) ? " (it is a folder; name the PEM file in it)" : ""));

        string What(string key, string path) => $"{nameOf(key)}='{path}'";

        var authorities = new X509Certificate2Collection();
        try { authorities.ImportFromPemFile(caPath!); }
        catch (CryptographicException e) { throw new ArgumentException($"{What(CaPathKey, caPath!)} is not a PEM certificate file ({e.Message})", e); }
        if (authorities.Count == 0) throw new ArgumentException($"{What(CaPathKey, caPath!)} holds no -----BEGIN CERTIFICATE----- block");

        var chain = new X509Certificate2Collection();
        try { chain.ImportFromPemFile(certificatePath!); }
        catch (CryptographicException e) { throw new ArgumentException($"{What(CertificatePathKey, certificatePath!)} is not a PEM certificate file ({e.Message})", e); }
        if (chain.Count == 0) throw new ArgumentException($"{What(CertificatePathKey, certificatePath!)} holds no -----BEGIN CERTIFICATE----- block");

        X509Certificate2 certificate;
        try { certificate = X509Certificate2.CreateFromPemFile(certificatePath!, keyPath); }
        catch (Exception e) when (e is CryptographicException or ArgumentException) // ArgumentException: a key of another certificate
        {
            // The message says what is wrong with the key (not PEM, encrypted, not this certificate's) and never quotes it.
            throw new ArgumentException($"{What(KeyPathKey, keyPath!)} is not the private key of the certificate in " +
                $"{What(CertificatePathKey, certificatePath!)} ({e.Message})", e);
        }
        // SChannel cannot use a key that lives only in memory; elsewhere the PEM-loaded key works as it is.
        if (OperatingSystem.IsWindows())
            certificate = X509CertificateLoader.LoadPkcs12(certificate.Export(X509ContentType.Pkcs12), null);
        var intermediates = new X509Certificate2Collection();
        foreach (var c in chain.Skip(1)) intermediates.Add(c);

        var tls = new ClusterTls(certificate, intermediates, authorities);
        if (tls.Problem(certificate, intermediates, usage: null) is { } problem)
            throw new ArgumentException($"{What(CertificatePathKey, certificatePath!)} ({Describe(certificate)}) does not chain to the CA in " +
                $"{What(CaPathKey, caPath!)}: {problem}");
        return tls;
    }

    /// <summary>Why a connecting client's certificate is refused, or null when it is a member's.</summary>
    public TlsRefusal? CheckClient(X509Certificate? presented, X509Chain? presentedChain) => Check(presented, presentedChain, ClientAuthentication, "client");

    /// <summary>Why a server's certificate is refused, or null when it is a member's.</summary>
    public TlsRefusal? CheckServer(X509Certificate? presented, X509Chain? presentedChain) => Check(presented, presentedChain, ServerAuthentication, "server");

    /// <summary>
    /// What a client of a cluster service uses: it presents this process's certificate and accepts only a server whose
    /// certificate chains to the cluster CA and names the host it dialled.
    /// </summary>
    public SslClientAuthenticationOptions ClientOptions() => new()
    {
        ClientCertificateContext = CertificateContext,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        // The platform's chain verdict uses the machine's roots, so its chain errors are replaced by the check against
        // the cluster CA; a name mismatch (or no certificate) still refuses.
        RemoteCertificateValidationCallback = (_, certificate, chain, errors) =>
            (errors & ~SslPolicyErrors.RemoteCertificateChainErrors) == SslPolicyErrors.None && CheckServer(certificate, chain) is null,
    };

    TlsRefusal? Check(X509Certificate? presented, X509Chain? presentedChain, Oid usage, string role)
    {
        if (presented is null) return new TlsRefusal(Missing, $"no {role} certificate presented");
        var certificate = presented as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(presented.GetRawCertData());
        var extra = new X509Certificate2Collection();
        // Intermediates the peer sent; the leaf and any root in there are not trusted for being sent.
        if (presentedChain is not null)
            foreach (var element in presentedChain.ChainElements)
                if (!element.Certificate.RawDataMemory.Span.SequenceEqual(certificate.RawDataMemory.Span)) extra.Add(element.Certificate);
        return Problem(certificate, extra, usage) is { } problem
            ? new TlsRefusal(Untrusted, $"{role} certificate {Describe(certificate)} is not trusted: {problem}")
            : null;
    }

    /// <summary>Null when <paramref name="certificate"/> chains to the cluster CA (and allows <paramref name="usage"/>), else the chain's complaints.</summary>
    string? Problem(X509Certificate2 certificate, X509Certificate2Collection intermediates, Oid? usage)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(_authorities);
        chain.ChainPolicy.ExtraStore.AddRange(intermediates);
        // A private cluster CA publishes no revocation lists; rotation (new certificates, new CA) is how a member is removed.
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        if (usage is not null) chain.ChainPolicy.ApplicationPolicy.Add(usage);
        if (chain.Build(certificate)) return null;
        var complaints = chain.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct().ToList();
        return complaints.Count > 0 ? string.Join("; ", complaints) : "the chain does not build";
    }

    /// <summary>Public facts that identify a certificate in a log line: subject, issuer, thumbprint. Never the key.</summary>
    public static string Describe(X509Certificate2 certificate) =>
        $"'{certificate.Subject}' issued by '{certificate.Issuer}', SHA-256 {certificate.GetCertHashString(HashAlgorithmName.SHA256)[..16]}…";

    public override string ToString() => $"ClusterTls({Describe(Certificate)})";
}

/// <summary>A peer refused at the TLS layer: <see cref="Reason"/> is a metric label value, <see cref="Detail"/> is for the log.</summary>
public sealed record TlsRefusal(string Reason, string Detail);
