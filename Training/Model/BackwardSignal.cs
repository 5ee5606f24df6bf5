// An identity on a tensor whose backward tells the trainer that everything computed from it has had its backward; not a
// hook on parameters (TorchSharp has no post-accumulate-grad hook), and not a recompute segment (nothing runs again).
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// What a <see cref="BackwardSignal"/> calls. <see cref="Done"/> runs inside libtorch's autograd engine, called back from
/// native code (on CUDA, on the engine's device thread): an exception there cannot unwind through the engine's frames and
/// would abort the process, so the signal catches whatever <see cref="Done"/> throws and hands it to <see cref="Failed"/>,
/// which keeps it for the caller of <c>backward()</c> to throw.
/// </summary>
public interface IBackwardListener
{
    void Done();
    /// <summary>What <see cref="Done"/> threw; must not throw itself.</summary>
    void Failed(Exception error);
}

/// <summary>
/// The autograd function the data-parallel overlap listens on (Engine/OverlappedGradientReduction.cs), as ZeRO-3 listens
/// on its layers' recompute segments (<see cref="GatheredParameters.Differentiated"/>): on a decoder layer's input, and on
/// the main model's last hidden state (the final norm's input, <see cref="DeepSeekModel.HeadBackwardDone"/>). Forward
/// returns its input; backward calls the listener, then passes the gradient on unchanged. When the engine runs this node,
/// every node created after it in the forward has run, the AccumulateGrad of every parameter used only after it included:
/// the engine runs ready nodes in descending sequence number (nodes are numbered in the order the forward created them,
/// AccumulateGrad highest), and a node created later that had not run would have a not-yet-run node created later still
/// before it, and so on, until one that is ready and outranks this one. The node after the last layer's is thus the first
/// to fire, the first layer's the last: one order on every rank, since each layer's input gradient needs the layer after it.
/// <para>
/// Native lifetimes: the listener lives in the node's context (TorchSharp keeps the node until libtorch frees the graph);
/// the incoming gradient's wrapper is returned as is, and libtorch copies it before the wrapper can be freed (the step's
/// dispose scope on the CPU, the step's <c>FinalizerHold</c> on a CUDA engine thread). Nothing is marked dirty or
/// non-differentiable: TorchSharp 0.107's <c>WrapOutputs</c> passes the first of those lists through an array it has
/// already unpinned, harmless only while both are empty.
/// </para>
/// </summary>
sealed class BackwardSignal : SingleTensorFunction<BackwardSignal>
{
    public override string Name => nameof(BackwardSignal);

    /// <summary><paramref name="x"/> unchanged, with <paramref name="listener"/> called when its gradient is complete.</summary>
    public static Tensor Around(Tensor x, IBackwardListener listener)
    {
        var forwarded = new Forwarded();
        var y = apply(x, listener, forwarded);
        // The node's copy of its output would hold one more (B, T, D) per layer until the backward: a stand-in instead.
        FunctionOutputCache.Shrink(forwarded.Context);
        return y;
    }

    /// <summary>The context the forward ran with, for the node's output cache (<see cref="FunctionOutputCache"/>).</summary>
    sealed class Forwarded { public AutogradContext? Context; }

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        ctx.save_data("listener", vars[1]);
        ((Forwarded)vars[2]).Context = ctx;
        return ((Tensor)vars[0]).alias();
    }

    public override List<Tensor> backward(AutogradContext ctx, Tensor grad_output)
    {
        var listener = (IBackwardListener)ctx.get_data("listener");
        try { listener.Done(); }
        catch (Exception e)
        {
            try { listener.Failed(e); }
            catch { } // nothing may leave this frame (see IBackwardListener); the listener's contract is not to throw here
        }
        return [grad_output, null!, null!];
    }
}
