// A tiny model and an AdamW whose every tensor (weights, routing biases, both moments) holds distinct random values
// (the same as tests/Training.Tests/Checkpoints/TrainedState.cs, which this project cannot reference).
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

sealed class TrainedState : IDisposable
{
    public static DeepSeekConfig Config => DeepSeekConfig.Tiny(96); // 4 layers: 2 per stage at pp = 2

    public DeepSeekForCausalLM Model { get; }
    public AdamW Optimizer { get; }
    public List<KeyValuePair<string, Tensor>> Tensors => CheckpointTensors.Collect(Model, Optimizer);

    /// <param name="fill">False: a fresh model (other seed) and zero moments, the target of a load.</param>
    public TrainedState(long seed, bool fill = true)
    {
        manual_seed(seed);
        Model = new DeepSeekForCausalLM(Config).InitializeWeights();
        Optimizer = new AdamW(Model.named_parameters().Select(p => (Model.ToHfName(p.name), (Tensor)p.parameter)));
        if (!fill) return;
        using var noGrad = no_grad();
        foreach (var s in Optimizer.Slots)
        {
            s.ExpAvg.copy_(randn_like(s.ExpAvg));
            s.ExpAvgSq.copy_(rand_like(s.ExpAvgSq));
        }
        foreach (var moe in Model.MoeLayers()) moe.gate.e_score_correction_bias.copy_(randn_like(moe.gate.e_score_correction_bias));
        Optimizer.StepCount = 37;
    }

    public static bool BitwiseEqual(Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.contiguous().cpu().bytes.SequenceEqual(b.contiguous().cpu().bytes);

    public void Dispose()
    {
        Optimizer.Dispose();
        Model.Dispose();
    }
}
