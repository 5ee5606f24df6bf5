// SwiGLU feed-forward (HF DeepseekV3MLP): down(silu(gate(x)) * up(x)). Used dense and as each expert.
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

public sealed class SwiGluMlp : nn.Module<Tensor, Tensor>
{
    public Linear gate_proj, up_proj, down_proj;

    public SwiGluMlp(long hidden, long intermediate) : base(nameof(SwiGluMlp))
    {
        gate_proj = nn.Linear(hidden, intermediate, hasBias: false);
        up_proj = nn.Linear(hidden, intermediate, hasBias: false);
        down_proj = nn.Linear(intermediate, hidden, hasBias: false);
        RegisterComponents();
    }

    /// <summary>Selective recompute: keep gate and up; silu(gate) is made again in backward.</summary>
    public bool RecomputeProduct { get; set; }

    public override Tensor forward(Tensor x)
    {
        using var gate = gate_proj.forward(x);
        using var up = up_proj.forward(x);
        using var h = ActivationRecompute.Active(RecomputeProduct, training) ? ActivationRecompute.Run(t => [Product(t[0], t[1])], [gate, up], [])[0] : Product(gate, up);
        return down_proj.forward(h);
    }

    internal static Tensor Product(Tensor gate, Tensor up)
    {
        using var act = nn.functional.silu(gate);
        return act * up;
    }
}
