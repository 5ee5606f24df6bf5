// A synthetic objective with a known optimum (learning rate 1e-3, weight decay 0.1) and study specs over it.
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

static class SyntheticStudies
{
    public static readonly SearchDimension Lr = new() { Path = "schedule.peakLr", Kind = "logUniform", Low = 1e-5, High = 1e-1 };
    public static readonly SearchDimension WeightDecay = new() { Path = "weightDecay", Kind = "uniform", Low = 0, High = 0.3 };

    /// <summary>The final loss of a configuration: a bowl around log10(lr) = −3 and weight decay 0.1, minimum 1.</summary>
    public static double Final(double lr, double weightDecay) => 1 + Math.Pow(Math.Log10(lr) + 3, 2) + 10 * Math.Pow(weightDecay - 0.1, 2);

    /// <summary>The loss after <paramref name="step"/> steps: the final loss plus a term that decays with training.</summary>
    public static double At(double lr, double weightDecay, long step) => Final(lr, weightDecay) + 3 / Math.Sqrt(step);

    public static StudySpec Spec(string sampler, int seed, string scheduler = "fifo", int trials = 30) => new()
    {
        Job = TestSpecs.Tiny(1, 1, steps: 90) with { EvalInterval = 10 },
        Space = [Lr, WeightDecay],
        Budget = new StudyBudget { Trials = trials },
        Sampler = new SamplerSpec { Kind = sampler, Seed = seed },
        Scheduler = new SchedulerSpec { Kind = scheduler, GracePeriod = 10, ReductionFactor = 3 },
    };

    public static string Json(StudySpec spec) => JsonSerializer.Serialize(spec, JobSpecJson.Options);
}
