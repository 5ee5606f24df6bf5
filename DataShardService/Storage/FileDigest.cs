// Checks a local file against an expected length and SHA-256; used before any shard bytes are served.
using System.Security.Cryptography;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Storage;

public static class FileDigest
{
    /// <summary>Null when the file has <paramref name="bytes"/> bytes and SHA-256 <paramref name="sha256"/>, else what differs.</summary>
    public static async Task<string?> MismatchAsync(string file, long bytes, string sha256, CancellationToken ct)
    {
        await using var s = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
        if (s.Length != bytes)
            return $"it has {s.Length} bytes, the manifest says {bytes}";
        string actual = Convert.ToHexStringLower(await SHA256.HashDataAsync(s, ct));
        return string.Equals(actual, sha256, StringComparison.OrdinalIgnoreCase) ? null
            : $"SHA-256 {actual}, the manifest says {sha256}";
    }

    /// <summary>Throws a Corrupt <see cref="DataInputException"/> naming <paramref name="where"/> when the file does not match.</summary>
    public static async Task VerifyAsync(string file, long bytes, string sha256, string where, CancellationToken ct)
    {
        if (await MismatchAsync(file, bytes, sha256, ct) is { } mismatch)
            throw new DataInputException(DataErrorKind.Corrupt, $"Shard {where} is corrupt: {mismatch}; refusing to serve it.");
    }
}
