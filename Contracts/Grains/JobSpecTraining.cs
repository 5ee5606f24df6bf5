// The optimizer knobs and the step guard of a job spec, with their checks; JobSpec.cs holds the rest of the spec.
namespace DeepSeekCluster.Contracts.Grains;

public sealed partial record JobSpec
{
    void ValidateTraining(Action<string, string> problem)
    {
        if (!(WeightDecay >= 0 && WeightDecay < 1)) problem("weightDecay", $"{WeightDecay} must be in [0, 1) (AdamW's decoupled decay per unit of learning rate)");
        if (!(ClipNorm >= 0 && double.IsFinite(ClipNorm))) problem("clipNorm", $"{ClipNorm} must be 0 (no clipping) or a positive gradient norm");
        if (!(MtpWeight >= 0 && double.IsFinite(MtpWeight))) problem("mtpWeight", $"{MtpWeight} must be 0 (no MTP loss) or a positive weight");
        if (!(BiasUpdateSpeed >= 0 && BiasUpdateSpeed < 1)) problem("biasUpdateSpeed", $"{BiasUpdateSpeed} must be in [0, 1) (0 turns the routing-bias balancing off)");
        if (!(Beta1 >= 0 && Beta1 < 1)) problem("beta1", $"{Beta1} must be in [0, 1)");
        if (!(Beta2 >= 0 && Beta2 < 1)) problem("beta2", $"{Beta2} must be in [0, 1)");
        if (!(Epsilon > 0 && Epsilon < 1)) problem("epsilon", $"{Epsilon} must be in (0, 1) (AdamW's ε, typically 1e-8)");
        if (Guard is null) { problem("guard", "required (leave it out for the defaults)"); return; }
        foreach (var (field, message) in Guard.Problems()) problem("guard." + field, message);
    }

    void ValidateDecayFraction(Action<string, string> problem)
    {
        double f = Schedule.DecayFraction;
        if (!(f >= 0 && f <= 1)) { problem("schedule.decayFraction", $"{f} must be between 0 and 1 (the share of the steps the wsd decay takes)"); return; }
        // LrSchedule.Wsd refuses a decay that starts inside the warmup: say so here instead of failing on the worker.
        long decaySteps = (long)Math.Round(f * Steps, MidpointRounding.AwayFromZero);
        if (Schedule.Kind == "wsd" && Steps >= 1 && Steps - decaySteps < Schedule.WarmupSteps)
            problem("schedule.decayFraction", $"{f} makes the decay ({decaySteps} of {Steps} steps) start inside the warmup ({Schedule.WarmupSteps} steps)");
    }
}

/// <summary>
/// The step guard of a job (docs/agent.md). A step whose loss or gradient norm is NaN/Inf is never applied, always. The
/// spike rule (on by default): after the job's first <see cref="Warmup"/> steps, once <see cref="MinHistory"/> good steps are known, a step whose loss or gradient norm lies more than
/// <see cref="Threshold"/> robust deviations (1.4826·MAD, but at least 5% of the median) above the median
/// of the last <see cref="Window"/> good steps is a spike; so are <see cref="MaxSkips"/> non-finite steps in a row. A spike
/// rolls the live state back to the last snapshot (taken every <see cref="SnapshotEvery"/> good steps), skips the samples
/// since it, multiplies the learning rate by <see cref="LrFactor"/>; the <see cref="MaxRollbacks"/>+1-th spike fails the job.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record StepGuardSpec
{
    /// <summary>
    /// true (the default): the spike rule and its rollbacks (with host snapshots); false: only the NaN/Inf skip, and
    /// <see cref="MaxSkips"/> non-finite steps in a row fail the job. The rule's window travels with the live state and the
    /// checkpoints, so a re-formed or resumed job judges its steps as the undisturbed run would (docs/agent.md).
    /// </summary>
    [Id(0)] public bool Rollback { get; init; } = true;
    [Id(1)] public int Window { get; init; } = 50;
    [Id(2)] public int MinHistory { get; init; } = 10;
    [Id(3)] public double Threshold { get; init; } = 10;
    [Id(4)] public int SnapshotEvery { get; init; } = 10;
    [Id(5)] public double LrFactor { get; init; } = 1.0;
    [Id(6)] public int MaxRollbacks { get; init; } = 3;
    [Id(7)] public int MaxSkips { get; init; } = 3;
    /// <summary>
    /// The job's first steps (its step count, not a generation's) that are neither judged for spikes nor kept in the
    /// window: early training's falling loss and swinging gradient norms set no range for the later steps.
    /// </summary>
    [Id(8)] public int Warmup { get; init; } = 50;

    public IEnumerable<(string Field, string Message)> Problems()
    {
        if (Window < 3) yield return ("window", $"{Window} must be at least 3 steps (the median and MAD need a few)");
        if (MinHistory < 3 || MinHistory > Window) yield return ("minHistory", $"{MinHistory} must be between 3 and window ({Window})");
        if (!(Threshold > 0 && double.IsFinite(Threshold))) yield return ("threshold", $"{Threshold} must be a positive number of robust deviations");
        if (SnapshotEvery < 1) yield return ("snapshotEvery", $"{SnapshotEvery} must be at least 1 step");
        if (!(LrFactor > 0 && LrFactor <= 1)) yield return ("lrFactor", $"{LrFactor} must be in (0, 1] (1 keeps the learning rate after a rollback)");
        if (MaxRollbacks < 0) yield return ("maxRollbacks", $"{MaxRollbacks} must be 0 (fail at the first spike) or positive");
        if (MaxSkips < 1) yield return ("maxSkips", $"{MaxSkips} must be at least 1 non-finite step in a row");
        if (Warmup < 0) yield return ("warmup", $"{Warmup} must be 0 (judge from the first step) or a positive number of steps");
    }
}
