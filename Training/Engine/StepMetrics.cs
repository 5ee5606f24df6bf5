// What one optimizer step reports: losses, schedule, gradient norm, throughput, MFU, time split and expert load.
namespace DeepSeekCluster.Training.Engine;

public sealed record StepTimes(double DataSeconds, double ForwardSeconds, double BackwardSeconds, double CommunicationSeconds, double OptimizerSeconds)
{
    public double Total => DataSeconds + ForwardSeconds + BackwardSeconds + CommunicationSeconds + OptimizerSeconds;
}

public sealed record StepMetrics(
    long Step,
    double Loss,              // LM cross-entropy, nats/token
    double? MtpLoss,          // mean MTP cross-entropy over depths
    double? AuxLoss,
    double LearningRate,
    double GradNorm,
    double TokensPerSecond,
    double Mfu,               // fraction of the measured matmul peak
    StepTimes Times,
    IReadOnlyList<long[]> ExpertLoad) // per MoE layer (main layers, then MTP), tokens per expert in this step
{
    /// <summary>max/mean tokens per expert, averaged over layers (1 is perfect balance).</summary>
    public double LoadImbalance => ExpertLoad.Count == 0 ? 1 : ExpertLoad.Average(l => l.Average() == 0 ? 1 : l.Max() / l.Average());
}
