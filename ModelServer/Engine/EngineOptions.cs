// The engine's limits, bound from configuration section Serving (docs/serving.md lists every key).
namespace DeepSeekCluster.ModelServer.Engine;

public sealed record EngineOptions
{
    /// <summary>Most requests decoding together: the batch of one decode step.</summary>
    public int MaxBatch { get; init; } = 64;
    /// <summary>Accepted requests not yet running; one more is refused with 429.</summary>
    public int MaxWaiting { get; init; } = 256;
    /// <summary>Tokens per cache block.</summary>
    public int BlockSize { get; init; } = 16;
    /// <summary>Blocks in the preallocated latent pool (0: enough for MaxBatch full contexts).</summary>
    public int CacheBlocks { get; init; }
    /// <summary>Prompt tokens prefilled per engine step, over all requests, before the step's decode runs (chunked prefill).</summary>
    public int PrefillTokensPerStep { get; init; } = 512;
    /// <summary>Decode attends in MLA's latent space (absorbed W_UK/W_UV) instead of expanding the cache each step.</summary>
    public bool AbsorbedDecode { get; init; } = true;

    public EngineOptions Validated()
    {
        if (MaxBatch < 1) throw new ArgumentException($"Serving:MaxBatch must be at least 1, got {MaxBatch}");
        if (MaxWaiting < 0) throw new ArgumentException($"Serving:MaxWaiting must be 0 or more, got {MaxWaiting}");
        if (BlockSize < 1) throw new ArgumentException($"Serving:BlockSize must be at least 1, got {BlockSize}");
        if (CacheBlocks < 0) throw new ArgumentException($"Serving:CacheBlocks must be 0 (automatic) or more, got {CacheBlocks}");
        if (PrefillTokensPerStep < 1) throw new ArgumentException($"Serving:PrefillTokensPerStep must be at least 1, got {PrefillTokensPerStep}");
        return this;
    }
}
