// Learning-rate schedules as pure functions of the optimizer step (0-based), so a resumed job
// needs nothing but the step to continue the same curve. Not an optimizer.
namespace DeepSeekCluster.Training.Optim;

/// <summary>
/// Common to all schedules with warmup: for step &lt; WarmupSteps the rate rises linearly,
/// lr(step) = peak·(step+1)/WarmupSteps, so step 0 already trains (at peak/WarmupSteps) and the
/// last warmup step reaches the peak. WarmupSteps = 0 means no warmup.
/// </summary>
public abstract record LrSchedule
{
    /// <summary>Names accepted by <see cref="Parse"/>.</summary>
    public static readonly IReadOnlyList<string> Names = ["cosine", "wsd", "constant"];

    /// <summary>The learning rate for optimizer step <paramref name="step"/> (0-based).</summary>
    public abstract double At(long step);

    /// <summary>
    /// The schedule called <paramref name="name"/> ("cosine", "wsd" or "constant", any case) with
    /// these settings; settings a schedule does not use are ignored.
    /// </summary>
    public static LrSchedule Parse(string name, double peakLr, long warmupSteps, long totalSteps,
        double minLrRatio = 0.1, double decayFraction = 0.2) =>
        name.Trim().ToLowerInvariant() switch
        {
            "cosine" => new WarmupCosine(peakLr, warmupSteps, totalSteps, minLrRatio),
            "wsd" => new WarmupStableDecay(peakLr, warmupSteps, totalSteps, decayFraction, minLrRatio),
            "constant" => new Constant(peakLr, warmupSteps),
            _ => throw new ArgumentException(
                $"Unknown learning-rate schedule '{name}'; expected one of: {string.Join(", ", Names)}.", nameof(name)),
        };

    /// <summary>
    /// Linear warmup, then a half cosine from PeakLr at step WarmupSteps down to
    /// PeakLr·MinLrRatio at step TotalSteps, flat at that minimum afterwards.
    /// </summary>
    public sealed record WarmupCosine(double PeakLr, long WarmupSteps, long TotalSteps, double MinLrRatio = 0.1) : LrSchedule
    {
        public double PeakLr { get; init; } = RequirePositive(PeakLr, nameof(PeakLr));
        public long WarmupSteps { get; init; } = RequireNonNegative(WarmupSteps, nameof(WarmupSteps));
        public long TotalSteps { get; init; } = RequireAtLeast(TotalSteps, WarmupSteps, nameof(TotalSteps), nameof(WarmupSteps));
        public double MinLrRatio { get; init; } = RequireRatio(MinLrRatio, nameof(MinLrRatio));

        public override double At(long step)
        {
            if (step < WarmupSteps)
                return Warmup(PeakLr, step, WarmupSteps);
            double minLr = PeakLr * MinLrRatio;
            if (step >= TotalSteps)
                return minLr;
            double progress = (double)(step - WarmupSteps) / (TotalSteps - WarmupSteps); // [0, 1)
            return minLr + (PeakLr - minLr) * 0.5 * (1 + Math.Cos(Math.PI * progress));
        }
    }

    /// <summary>
    /// Warmup-stable-decay: linear warmup, PeakLr until the last DecayFraction of TotalSteps, then a
    /// linear decay reaching PeakLr·MinLrRatio at step TotalSteps, flat afterwards. Linear rather
    /// than 1-sqrt: simpler to read, and the two differ little at this project's scales.
    /// The decay starts at step TotalSteps − round(DecayFraction·TotalSteps), which must not fall
    /// inside the warmup.
    /// </summary>
    public sealed record WarmupStableDecay(
        double PeakLr, long WarmupSteps, long TotalSteps, double DecayFraction = 0.2, double MinLrRatio = 0.1) : LrSchedule
    {
        public double PeakLr { get; init; } = RequirePositive(PeakLr, nameof(PeakLr));
        public long WarmupSteps { get; init; } = RequireNonNegative(WarmupSteps, nameof(WarmupSteps));
        public long TotalSteps { get; init; } = RequireAtLeast(TotalSteps, WarmupSteps, nameof(TotalSteps), nameof(WarmupSteps));
        public double DecayFraction { get; init; } = RequireDecayFraction(DecayFraction, WarmupSteps, TotalSteps);
        public double MinLrRatio { get; init; } = RequireRatio(MinLrRatio, nameof(MinLrRatio));

        public long DecaySteps => (long)Math.Round(DecayFraction * TotalSteps, MidpointRounding.AwayFromZero);

        public long DecayStart => TotalSteps - DecaySteps;

        public override double At(long step)
        {
            if (step < WarmupSteps)
                return Warmup(PeakLr, step, WarmupSteps);
            if (step < DecayStart)
                return PeakLr;
            double minLr = PeakLr * MinLrRatio;
            if (step >= TotalSteps)
                return minLr;
            double progress = (double)(step - DecayStart) / DecaySteps; // [0, 1)
            return PeakLr - (PeakLr - minLr) * progress;
        }

        private static double RequireDecayFraction(double fraction, long warmupSteps, long totalSteps)
        {
            RequireRatio(fraction, nameof(DecayFraction));
            long decaySteps = (long)Math.Round(fraction * totalSteps, MidpointRounding.AwayFromZero);
            if (totalSteps - decaySteps < warmupSteps)
                throw new ArgumentOutOfRangeException(nameof(DecayFraction), fraction,
                    $"The decay ({decaySteps} of {totalSteps} steps) would start inside the warmup ({warmupSteps} steps).");
            return fraction;
        }
    }

    /// <summary>Linear warmup, then PeakLr forever.</summary>
    public sealed record Constant(double PeakLr, long WarmupSteps = 0) : LrSchedule
    {
        public double PeakLr { get; init; } = RequirePositive(PeakLr, nameof(PeakLr));
        public long WarmupSteps { get; init; } = RequireNonNegative(WarmupSteps, nameof(WarmupSteps));

        public override double At(long step) => step < WarmupSteps ? Warmup(PeakLr, step, WarmupSteps) : PeakLr;
    }

    // ---- Shared pieces ----

    private static double Warmup(double peakLr, long step, long warmupSteps) =>
        peakLr * (Math.Max(step, 0) + 1) / warmupSteps;

    private static double RequirePositive(double value, string name) =>
        value > 0 && double.IsFinite(value) ? value
            : throw new ArgumentOutOfRangeException(name, value, "The learning rate must be a positive number.");

    private static long RequireNonNegative(long value, string name) =>
        value >= 0 ? value : throw new ArgumentOutOfRangeException(name, value, "The step count cannot be negative.");

    private static long RequireAtLeast(long value, long floor, string name, string floorName) =>
        value >= floor ? value
            : throw new ArgumentOutOfRangeException(name, value, $"{name} must be at least {floorName} ({floor}).");

    private static double RequireRatio(double value, string name) =>
        value >= 0 && value <= 1 ? value
            : throw new ArgumentOutOfRangeException(name, value, $"{name} must be between 0 and 1.");
}
