// Configuration of the blob backend (section "Storage"; the Azure connection string is ConnectionStrings:blobs).
using System.ComponentModel.DataAnnotations;

namespace DeepSeekCluster.CheckpointStore.Storage;

public sealed class StorageOptions
{
    public const string Section = "Storage";

    /// <summary>Root folder of the folder backend, used when ConnectionStrings:blobs is not set.</summary>
    [Required(AllowEmptyStrings = false)]
    public string Folder { get; set; } = "./.data/checkpoints";

    /// <summary>Azure container; with the folder backend's default this gives the same checkpoints/{job}/... address.</summary>
    [Required(AllowEmptyStrings = false), RegularExpression("^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$",
        ErrorMessage = "Storage:Container must be an Azure container name: 3-63 lower-case letters, digits and single hyphens.")]
    public string Container { get; set; } = "checkpoints";

    /// <summary>Tries of one blob call before the store gives up with Unavailable (on Azure: the SDK's MaxRetries + 1).</summary>
    [Range(1, 20, ErrorMessage = "Storage:RetryCount must be between 1 and 20.")]
    public int RetryCount { get; set; } = 6;

    /// <summary>First backoff; it doubles after each failed try up to <see cref="RetryMaxDelayMs"/> (0.5, 1, 2, 4, 8 s by default).</summary>
    [Range(0, 60_000, ErrorMessage = "Storage:RetryBaseDelayMs must be between 0 and 60000.")]
    public int RetryBaseDelayMs { get; set; } = 500;

    /// <summary>Longest single backoff. The defaults ride out about 15 s of unreachable storage per call.</summary>
    [Range(0, 600_000, ErrorMessage = "Storage:RetryMaxDelayMs must be between 0 and 600000.")]
    public int RetryMaxDelayMs { get; set; } = 8_000;

    /// <summary>Upload chunks are gathered to this size before they are staged: fewer, larger Azure blocks (50,000 per blob at most).</summary>
    [Range(64 * 1024, 100 * 1024 * 1024, ErrorMessage = "Storage:BlockBytes must be between 65536 and 104857600.")]
    public int BlockBytes { get; set; } = 8 * 1024 * 1024;

    /// <summary>Per-request network timeout of the Azure client; an unreachable account then fails in seconds, not minutes.</summary>
    [Range(1, 600, ErrorMessage = "Storage:NetworkTimeoutSeconds must be between 1 and 600.")]
    public int NetworkTimeoutSeconds { get; set; } = 30;

    /// <summary>The wait before try <paramref name="attempt"/> + 1: exponential from the base, capped (the schedule the Azure SDK also follows, less its jitter).</summary>
    public TimeSpan BackoffAfter(int attempt) =>
        TimeSpan.FromMilliseconds(Math.Min((double)RetryMaxDelayMs, RetryBaseDelayMs * Math.Pow(2, attempt - 1)));

    /// <summary>How long storage may stay unreachable before a call gives up: the sum of the backoffs (request time not counted).</summary>
    public TimeSpan RetryBudget => TimeSpan.FromMilliseconds(Enumerable.Range(1, RetryCount - 1).Sum(a => BackoffAfter(a).TotalMilliseconds));
}
