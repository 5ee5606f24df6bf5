// What MLA asks of a generation cache: where the new tokens sit, and every cached latent they may attend to.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// The keys one layer's new tokens attend to: (B, S, kv_lora_rank) latents and (B, S, qk_rope_head_dim) rotated
/// keys, and, when rows of a batch hold different lengths, Visible_B1TS (true where new token t of row b may see
/// key s). A null mask means the plain causal rule over the last T of S keys.
/// </summary>
public sealed record LatentKeys(Tensor Latent_BSC, Tensor RopeKey_BSR, Tensor? Visible_B1TS);

/// <summary>
/// A cache MLA can extend: <see cref="LatentKvCache"/> (one sequence or equal-length rows) or a server's paged
/// cache whose rows are different requests at different positions.
/// </summary>
public interface ILatentCache
{
    /// <summary>cos and sin for this step's new tokens at <paramref name="layer"/>, before it appends: (T, R), or (B, 1, T, R) when rows differ in position.</summary>
    (Tensor cos, Tensor sin) Rotation(RotaryEmbedding rotary, int layer, long newTokens, ScalarType dtype, Device device);

    /// <summary>Stores this step's entries for a layer and returns everything the new tokens attend to.</summary>
    LatentKeys Append(int layer, Tensor latent_BTC, Tensor ropeKey_BTR);
}
