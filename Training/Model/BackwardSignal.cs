// An identity on a decoder layer's input whose backward tells the trainer that the layer's backward is done; not a hook
// on parameters (TorchSharp has no post-accumulate-grad hook), and not a recompute segment (nothing runs again).
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// The per-layer autograd function the data-parallel overlap listens on (Engine/OverlappedGradientReduction.cs), as
/// ZeRO-3 listens on its layers' recompute segments (<see cref="GatheredParameters.Differentiated"/>). Forward returns its
/// input; backward calls the signal, then passes the gradient on unchanged. When the engine runs this node, every node
/// the layer's forward created has run, the layer's parameters' AccumulateGrad included: the engine runs ready nodes in
/// descending sequence number (nodes are numbered in the order the forward created them, AccumulateGrad highest), and
/// every node of the layer was created after this one. The node after the last layer's is thus the first to fire, the
/// first layer's the last: one order on every rank, since each layer's input gradient needs the layer after it.
/// </summary>
sealed class BackwardSignal : SingleTensorFunction<BackwardSignal>
{
    public override string Name => nameof(BackwardSignal);

    /// <summary><paramref name="x"/> unchanged, with <paramref name="signal"/> called when its gradient is complete.</summary>
    public static Tensor Around(Tensor x, Action signal) => apply(x, signal);

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        ctx.save_data("signal", vars[1]);
        return ((Tensor)vars[0]).alias();
    }

    public override List<Tensor> backward(AutogradContext ctx, Tensor grad_output)
    {
        ((Action)ctx.get_data("signal"))();
        return [grad_output, null!];
    }
}
