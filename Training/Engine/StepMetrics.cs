// What one optimizer step reports: losses, schedule, gradient norm, throughput, MFU, time split and expert load.
using DeepSeekCluster.Training.Perf;

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
    double Mfu,               // AchievedFlops / Peak, capped at 1 (see MfuReading)
    StepTimes Times,
    IReadOnlyList<long[]> ExpertLoad) // per MoE layer (main layers, then MTP), tokens per expert in this step
{
    /// <summary>Model FLOP/s this rank's device did in the step (with pp &gt; 1, its stage's equal share of the replica's).</summary>
    public double AchievedFlops { get; init; }
    /// <summary>The peak <see cref="Mfu"/> is measured against; null when none was given.</summary>
    public HardwarePeak? Peak { get; init; }
    /// <summary>The step's loss or gradient norm was NaN/Inf: its update was not applied (the samples are used up all the same).</summary>
    public bool Skipped { get; init; }
    /// <summary>The uncapped reading: <see cref="MfuReading.Capped"/> says the peak is too low.</summary>
    public MfuReading Utilization => MfuReading.Of(AchievedFlops, Peak?.FlopsPerSecond ?? 0);

    /// <summary>max/mean tokens per expert, averaged over layers (1 is perfect balance).</summary>
    public double LoadImbalance => ExpertLoad.Count == 0 ? 1 : ExpertLoad.Average(l => l.Average() == 0 ? 1 : l.Max() / l.Average());
}
