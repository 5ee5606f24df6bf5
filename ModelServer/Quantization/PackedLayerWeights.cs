// int8/int4 weights held as integers, expanded to float32 one decoder layer at a time into a shared scratch arena.
using DeepSeekCluster.Training.Model;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Quantization;

/// <summary>
/// Every nn.Linear weight of the decoder layers is replaced by a view into one float32 arena as large as the largest
/// layer's weights (all layers' views alias it), and kept as int8 codes (int8) or two 4-bit codes per byte (int4) with
/// float32 scales. <see cref="DeepSeekModel.BeforeLayer"/> expands a layer's codes into the arena just before the layer
/// runs, so the process holds the integer weights plus one layer in float32. The expanded values are exactly
/// <see cref="WeightQuantizer"/>'s rounded weights (same codes, same multiply). lm_head stays rounded float32 (it runs
/// after the last layer, outside the hook); embeddings, norms and the router stay float.
/// </summary>
public sealed class PackedLayerWeights : IDisposable
{
    sealed record Entry(Tensor Target, Tensor Codes, Tensor Scales, long Inputs);

    readonly WeightFormat format;
    readonly List<Entry>[] layers;
    readonly Tensor arena;

    public long PackedBytes { get; }
    public int Tensors => layers.Sum(l => l.Count);
    public long ArenaBytes => arena.numel() * 4;
    public long ReplacedFp32Bytes { get; }

    PackedLayerWeights(WeightFormat format, List<Entry>[] layers, Tensor arena, long packed, long replaced)
    {
        this.format = format; this.layers = layers; this.arena = arena; PackedBytes = packed; ReplacedFp32Bytes = replaced;
    }

    public static PackedLayerWeights Pack(DeepSeekForCausalLM model, WeightFormat format)
    {
        if (format is not (WeightFormat.Int8 or WeightFormat.Int4)) throw new ArgumentException($"{format} is not an integer format");
        var device = model.lm_head.weight!.device;
        var perLayer = new List<(Linear Linear, long Numel)>[model.model.layers.Count];
        for (int i = 0; i < perLayer.Length; i++)
            perLayer[i] = model.model.layers[i].modules().OfType<Linear>().Select(l => (l, l.weight!.numel())).ToList();
        long arenaSize = perLayer.Max(l => l.Sum(x => x.Numel));
        var arena = zeros(arenaSize, ScalarType.Float32, device);
        var layers = new List<Entry>[perLayer.Length];
        long packed = 0, replaced = 0;
        using var noGrad = no_grad();
        for (int i = 0; i < perLayer.Length; i++)
        {
            layers[i] = [];
            long offset = 0;
            foreach (var (linear, numel) in perLayer[i])
            {
                var w = linear.weight!;
                long[] shape = w.shape;
                Tensor codes, scales;
                if (format == WeightFormat.Int8) (codes, scales) = WeightQuantizer.Int8Codes(w);
                else
                {
                    var (q, s) = WeightQuantizer.Int4Codes(w);
                    codes = Pack4(q);
                    q.Dispose();
                    scales = s;
                }
                packed += codes.numel() + scales.numel() * 4;
                replaced += numel * 4;
                // The Parameter takes over the view's handle: it is the target the layer's weight is expanded into.
                var weight = new Parameter(arena.narrow(0, offset, numel).view(shape), requires_grad: false);
                linear.weight = weight;
                w.Dispose();
                layers[i].Add(new Entry(weight, codes, scales, shape[1]));
                offset += numel;
            }
        }
        var store = new PackedLayerWeights(format, layers, arena, packed, replaced);
        model.model.BeforeLayer = store.Materialize;
        return store;
    }

    /// <summary>Expands layer <paramref name="layer"/>'s codes into the arena (called by the model before the layer runs).</summary>
    public void Materialize(int layer)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var e in layers[layer])
        {
            var values = format == WeightFormat.Int8
                ? e.Codes.to_type(ScalarType.Float32) * e.Scales
                : WeightQuantizer.Int4Values(Unpack4(e.Codes), e.Scales, e.Inputs);
            e.Target.copy_(values);
        }
    }

    /// <summary>Codes in [-7, 7] (…, 128) → bytes (…, 64): (code + 8) of even positions low, odd positions high.</summary>
    static Tensor Pack4(Tensor q)
    {
        using var scope = NewDisposeScope();
        var shifted = (q.to_type(ScalarType.Int16) + 8).view([.. q.shape[..^1], q.shape[^1] / 2, 2]);
        var bytes = shifted.select(-1, 0) + shifted.select(-1, 1) * 16;
        return bytes.to_type(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    static Tensor Unpack4(Tensor packed)
    {
        var wide = packed.to_type(ScalarType.Int16);
        var low = wide.remainder(16) - 8;
        var high = wide.div(16, rounding_mode: RoundingMode.floor) - 8;
        return stack([low, high], -1).view([.. packed.shape[..^1], packed.shape[^1] * 2]);
    }

    public void Dispose()
    {
        foreach (var layer in layers)
            foreach (var e in layer) { e.Codes.Dispose(); e.Scales.Dispose(); }
        arena.Dispose();
    }
}
