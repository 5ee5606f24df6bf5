// The copy of each output that a TorchSharp autograd function's node keeps, shrunk to a one-element stand-in; not a
// general hook into TorchSharp's internals (one private list, read by name and checked).
using System.Reflection;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// TorchSharp 0.107's Function node keeps an <c>empty_like</c> of every output for as long as the graph lives, only to
/// make zeros when an output gets no gradient. For a recomputed layer (ActivationRecompute) that is one more copy of its
/// output per layer, which would cancel much of what recompute saves; for a <see cref="BackwardSignal"/> one more copy of
/// each layer's input. A zero-strided stand-in (one element) makes the same zeros. The field names are checked once: a
/// TorchSharp without them fails here, loudly, rather than keep the copy.
/// </summary>
static class FunctionOutputCache
{
    static readonly FieldInfo NodeField = typeof(AutogradContext).GetField("_node", BindingFlags.NonPublic | BindingFlags.Instance)
        ?? throw new MissingFieldException($"TorchSharp {typeof(AutogradContext).Assembly.GetName().Version}: AutogradContext._node, which FunctionOutputCache relies on, is gone");

    /// <summary>Shrinks the cache of the node whose forward got <paramref name="ctx"/>; call it right after the function's apply.</summary>
    public static void Shrink(AutogradContext? ctx)
    {
        if (ctx is null) return; // apply never called forward: nothing cached
        var node = NodeField.GetValue(ctx) ?? throw new InvalidOperationException("the function's context has no native node");
        var field = node.GetType().GetField("_outputCache", BindingFlags.NonPublic | BindingFlags.Instance)
            ?? throw new MissingFieldException($"TorchSharp: {node.GetType().Name}._outputCache, which FunctionOutputCache relies on, is gone");
        if (field.GetValue(node) is not List<Tensor> cache) return; // not executable (no input needs a gradient): no cache
        for (int i = 0; i < cache.Count; i++)
        {
            if (cache[i] is not { } full) continue;
            var standIn = zeros(Array.Empty<long>(), dtype: full.dtype, device: full.device).expand(full.shape).DetachFromDisposeScope();
            full.Dispose();
            cache[i] = standIn;
        }
    }
}
