// What the samplers learn from: each trial's values and its metric at one budget, comparable across trials.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

public static class StudyHistory
{
    /// <summary>The metric as "lower is better" (max mode negates it); its own inverse.</summary>
    public static double Lower(StudySpec spec, double metric) => spec.Mode == "max" ? -metric : metric;

    /// <summary>
    /// The observations at the largest step that at least startupTrials trials reported the metric at (as BOHB models the
    /// largest budget with enough results): a trial ASHA stopped early is compared at a budget it reached, never with a
    /// trial that trained longer. Too few anywhere: the budget the most trials reached (the sampler then draws at random).
    /// </summary>
    public static List<Observation> Observations(StudySpec spec, IReadOnlyList<TrialRecord> trials)
    {
        var byStep = trials.SelectMany(t => t.Curve.Select(p => (p.Step, Trial: t, p.Loss)))
            .GroupBy(x => x.Step).Select(g => (Step: g.Key, Points: g.ToList())).ToList();
        if (byStep.Count == 0) return [];
        var chosen = byStep.Where(s => s.Points.Count >= spec.Sampler.StartupTrials).OrderByDescending(s => s.Step).FirstOrDefault();
        if (chosen.Points is null) chosen = byStep.OrderByDescending(s => s.Points.Count).ThenByDescending(s => s.Step).First();
        return [.. chosen.Points.OrderBy(x => x.Trial.Index).Select(x => new Observation(x.Trial.Values, Lower(spec, x.Loss)))];
    }
}
