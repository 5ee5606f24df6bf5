// MLA's generation cache: per layer, the compressed latent c_KV (kv_lora_rank) and the rotated rope key (qk_rope_head_dim) per token.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// Holds, per layer, (B, S, kv_lora_rank) normalized latents and (B, S, qk_rope_head_dim) rotated keys —
/// kv_lora_rank + qk_rope_head_dim numbers per token and layer (576 for V3) instead of full keys and values
/// (2 * 128 * 192 = 49152 for V3). Keys and values are re-expanded from the latent at each step.
/// </summary>
public sealed class LatentKvCache : ILatentCache, IDisposable
{
    readonly Tensor?[] latent;
    readonly Tensor?[] ropeKey;

    public LatentKvCache(int layers)
    {
        latent = new Tensor?[layers];
        ropeKey = new Tensor?[layers];
    }

    /// <summary>Tokens already cached (the position of the next token).</summary>
    public long Length => latent[0]?.shape[1] ?? 0;

    /// <summary>Numbers stored per token and layer.</summary>
    public long ElementsPerTokenPerLayer => latent[0] is null ? 0 : latent[0]!.shape[2] + ropeKey[0]!.shape[2];

    public (Tensor cos, Tensor sin) Rotation(RotaryEmbedding rotary, int layer, long newTokens, ScalarType dtype, Device device) =>
        rotary.CosSin(latent[layer]?.shape[1] ?? 0, newTokens, dtype, device);

    /// <summary>Appends this step's entries for a layer and returns everything cached for it.</summary>
    public LatentKeys Append(int layer, Tensor latent_BTC, Tensor ropeKey_BTR)
    {
        var newLatent = latent[layer] is null ? latent_BTC.detach().clone() : cat([latent[layer]!, latent_BTC.detach()], 1);
        var newRope = ropeKey[layer] is null ? ropeKey_BTR.detach().clone() : cat([ropeKey[layer]!, ropeKey_BTR.detach()], 1);
        latent[layer]?.Dispose();
        ropeKey[layer]?.Dispose();
        newLatent.DetachFromDisposeScope();
        newRope.DetachFromDisposeScope();
        latent[layer] = newLatent;
        ropeKey[layer] = newRope;
        return new LatentKeys(newLatent.alias(), newRope.alias(), null);
    }

    public void Dispose()
    {
        foreach (var t in latent) t?.Dispose();
        foreach (var t in ropeKey) t?.Dispose();
        Array.Clear(latent);
        Array.Clear(ropeKey);
    }
}
