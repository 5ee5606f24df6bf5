// RMSNorm as in HF DeepseekV3RMSNorm: normalize in float32 (or wider), scale by a learned weight.
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    readonly double eps;

    public RmsNorm(long size, double eps = 1e-6) : base(nameof(RmsNorm))
    {
        weight = new Parameter(ones(size));
        this.eps = eps;
        RegisterComponents();
    }

    /// <summary>Selective recompute: keep only the input; the normalized product is made again in backward.</summary>
    public bool RecomputeNorm { get; set; }

    public override Tensor forward(Tensor x) =>
        ActivationRecompute.Active(RecomputeNorm, training) ? ActivationRecompute.Run(t => [Normalize(t[0])], [x], [weight])[0] : Normalize(x);

    internal Tensor Normalize(Tensor x)
    {
        using var scope = NewDisposeScope();
        var inputType = x.dtype;
        var x32 = inputType == ScalarType.Float64 ? x : x.to_type(ScalarType.Float32); // bf16/fp16 upcast, as HF does
        var normed = x32 * rsqrt(x32.pow(2).mean([-1L], keepdim: true) + eps);
        return (weight * normed.to_type(inputType)).MoveToOuterDisposeScope();
    }
}
