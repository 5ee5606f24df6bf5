// The cluster's shared secret: workers, services and REST writers present it as "Bearer <token>". Never logged.
using System.Security.Cryptography;
using System.Text;

namespace DeepSeekCluster.Coordinator;

public sealed class ClusterToken
{
    public const string ConfigKey = "Cluster:Token";

    private readonly byte[] _token;

    public ClusterToken(string token) => _token = Encoding.UTF8.GetBytes(token);

    /// <summary>Whether the token was generated at start (Cluster:Token unset) rather than configured.</summary>
    public bool Generated { get; private init; }

    /// <summary>Cluster:Token, or a fresh random token written (owner-only) to {StateFolder}/cluster.token for local clients.</summary>
    public static ClusterToken FromConfiguration(IConfiguration configuration, string stateFolder, ILogger logger)
    {
        string? configured = configuration[ConfigKey];
        if (!string.IsNullOrWhiteSpace(configured)) return new ClusterToken(configured);

        string token = Base64Url(RandomNumberGenerator.GetBytes(32));
        string file = Path.GetFullPath(Path.Combine(stateFolder, "cluster.token"));
        Directory.CreateDirectory(Path.GetDirectoryName(file)!);
        File.WriteAllText(file, token);
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        logger.LogWarning("{Key} is not set: generated a cluster token for this run and wrote it (owner-only) to {File}", ConfigKey, file);
        return new ClusterToken(token) { Generated = true };
    }

    /// <summary>Constant-time comparison, so the time to refuse says nothing about the token.</summary>
    public bool Matches(string? presented) =>
        presented is not null && CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(presented), _token);

    /// <summary>The token of an "Authorization: Bearer &lt;token&gt;" header value, or null.</summary>
    public static string? FromAuthorization(string? header) =>
        header is not null && header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase) ? header["Bearer ".Length..].Trim() : null;

    /// <summary>The token itself, for this process's own calls to CheckpointStore; never for a log or a reply.</summary>
    public string ForOutgoingCalls() => Encoding.UTF8.GetString(_token);

    public override string ToString() => "ClusterToken(***)";

    static string Base64Url(byte[] bytes) => Convert.ToBase64String(bytes).TrimEnd('=').Replace('+', '-').Replace('/', '_');
}
