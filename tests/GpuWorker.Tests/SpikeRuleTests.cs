// The step guard's rule against a hand-computed median and MAD, and its limits: skips in a row, rollbacks, failure.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests;

public class SpikeRuleTests
{
    static readonly StepGuardSpec Spec = new() { Warmup = 0, Window = 5, MinHistory = 5, Threshold = 10, SnapshotEvery = 2, MaxRollbacks = 2, MaxSkips = 2, LrFactor = 0.5 };

    [Fact]
    public void ASpikeIsMeasuredInRobustDeviationsFromTheMedianOfTheWindow()
    {
        var rule = new SpikeRule(Spec);
        // Losses 4.0 4.2 4.1 3.9 4.3: median 4.1, |x − 4.1| = .1 .1 0 .2 .2 → MAD .1, unit max(1.4826·0.1, 0.05·4.1) = 0.205.
        double[] losses = [4.0, 4.2, 4.1, 3.9, 4.3];
        for (int s = 0; s < losses.Length; s++)
            Assert.Equal(new GuardVerdict(GuardAct.Apply, "", (s + 1) % 2 == 0), rule.Judge(s + 1, losses[s], 1.0, skipped: false));
        // 4.1 + 10 × 0.205 = 6.15 is the edge: just below applies, just above rolls back.
        Assert.Equal(GuardAct.Apply, rule.Judge(6, 6.14, 1.0, false).Act);
        var spike = rule.Judge(7, 6.5, 1.0, false); // the window is now 4.2 4.1 3.9 4.3 6.14: median 4.2, unit 0.21, edge 6.3
        Assert.Equal(GuardAct.Rollback, spike.Act);
        Assert.Contains("loss 6.5 is", spike.Reason);
        Assert.Equal((1, 0.5), (rule.Rollbacks, rule.LrScale));
        // The gradient norm is judged the same way.
        Assert.Equal(GuardAct.Rollback, rule.Judge(8, 4.1, 50, false).Act);
        Assert.Equal(0.25, rule.LrScale);
        // The third divergence is one more than maxRollbacks (2): the job fails, saying why.
        var fail = rule.Judge(9, 100, 1.0, false);
        Assert.Equal(GuardAct.Fail, fail.Act);
        Assert.Contains("keeps diverging", fail.Reason);
        Assert.Contains("after 2 rollbacks", fail.Reason);
    }

    [Fact]
    public void NonFiniteStepsAreSkippedUntilTooManyInARowAndADownwardMoveIsNeverASpike()
    {
        var rule = new SpikeRule(Spec);
        Assert.Equal(GuardAct.Skip, rule.Judge(1, double.NaN, 1, skipped: true).Act);
        Assert.Equal(GuardAct.Apply, rule.Judge(2, 5, 1, false).Act); // a good step resets the count
        Assert.Equal(GuardAct.Skip, rule.Judge(3, 5, double.PositiveInfinity, skipped: true).Act);
        var diverged = rule.Judge(4, double.NaN, double.NaN, skipped: true);
        Assert.Equal(GuardAct.Rollback, diverged.Act);
        Assert.Contains("2 steps in a row", diverged.Reason);

        var falling = new SpikeRule(Spec);
        for (int s = 1; s <= 5; s++) falling.Judge(s, 5, 1, false);
        Assert.Equal(GuardAct.Apply, falling.Judge(6, 0.5, 0.01, false).Act);
        // A flat history (MAD 0) still tolerates noise within 5% of the median per deviation.
        Assert.Equal(GuardAct.Apply, falling.Judge(7, 7.4, 1, false).Act);
    }

    [Fact]
    public void WithoutRollbackADivergenceFailsTheJob()
    {
        var rule = new SpikeRule(Spec with { Rollback = false });
        Assert.Equal(GuardAct.Skip, rule.Judge(1, double.NaN, 1, true).Act);
        var verdict = rule.Judge(2, double.NaN, 1, true);
        Assert.Equal(GuardAct.Fail, verdict.Act);
        Assert.Contains("guard.rollback is off", verdict.Reason);
        Assert.Equal(new SpikeRule(Spec with { Rollback = false }).Judge(2, 1, 1, false), new GuardVerdict(GuardAct.Apply, "", false));
    }

    [Fact]
    public void TheRuleIsOnByDefaultAndTheJobsFirstStepsAreNeitherJudgedNorRemembered()
    {
        var defaults = new StepGuardSpec();
        Assert.True(defaults.Rollback);
        Assert.Equal(50, defaults.Warmup);
        var rule = new SpikeRule(Spec with { Warmup = 3 });
        // A loss falling tenfold and a norm jumping a hundredfold inside the warm-up: applied, and nothing kept.
        Assert.Equal(GuardAct.Apply, rule.Judge(1, 40, 0.1, false).Act);
        Assert.Equal(GuardAct.Apply, rule.Judge(2, 4, 10, false).Act);
        Assert.Equal(GuardAct.Apply, rule.Judge(3, 400, 1000, false).Act);
        Assert.Empty(rule.State.Losses);
        // A non-finite step in the warm-up is still never applied.
        Assert.Equal(GuardAct.Skip, new SpikeRule(Spec with { Warmup = 3 }).Judge(1, double.NaN, 1, true).Act);
        // From step 4 the window fills; at minHistory (5) good steps after the warm-up the rule judges.
        for (int s = 4; s <= 8; s++) Assert.Equal(GuardAct.Apply, rule.Judge(s, 4, 1, false).Act);
        Assert.Equal([4.0, 4, 4, 4, 4], rule.State.Losses);
        Assert.Equal(GuardAct.Rollback, rule.Judge(9, 40, 1, false).Act);
    }

    [Fact]
    public void ARuleResumedFromItsCarriedStateJudgesAsTheUninterruptedOne()
    {
        var spec = Spec with { Window = 6, MinHistory = 4, Warmup = 2, MaxRollbacks = 5 };
        // A noisy run with a NaN, a spike and a norm spike; the resumed rule takes over after every step in turn.
        var steps = Enumerable.Range(1, 24).Select(s => (Loss: s == 9 ? double.NaN : s == 13 ? 50 : 5 - 0.05 * s + 0.1 * Math.Sin(s * 1.7),
                                                          Norm: s == 17 ? 300 : 1 + 0.2 * Math.Cos(s * 2.3))).ToArray();
        var reference = new SpikeRule(spec);
        var verdicts = new List<GuardVerdict>();
        var states = new List<GuardState>();
        for (int s = 1; s <= steps.Length; s++)
        {
            verdicts.Add(reference.Judge(s, steps[s - 1].Loss, steps[s - 1].Norm, !double.IsFinite(steps[s - 1].Loss)));
            states.Add(reference.State);
        }
        Assert.Equal([GuardAct.Skip, GuardAct.Rollback, GuardAct.Rollback], verdicts.Where(v => v.Act != GuardAct.Apply).Select(v => v.Act));
        for (int at = 1; at < steps.Length; at++)
        {
            // Carried as the live-state broadcast carries it, and as a checkpoint's manifest does.
            var broadcast = GuardState.FromLongs(states[at - 1].ToLongs(spec.Window), spec.Window)!;
            var committed = GuardState.FromJson(System.Text.Json.Nodes.JsonNode.Parse(states[at - 1].ToJson().ToJsonString())!, "test");
            Assert.Equal(states[at - 1], broadcast);
            Assert.Equal(states[at - 1], committed);
            var resumed = new SpikeRule(spec, committed);
            for (int s = at + 1; s <= steps.Length; s++)
            {
                Assert.Equal(verdicts[s - 1], resumed.Judge(s, steps[s - 1].Loss, steps[s - 1].Norm, !double.IsFinite(steps[s - 1].Loss)));
                Assert.Equal(states[s - 1], resumed.State);
            }
        }
        Assert.Null(GuardState.FromLongs(new long[GuardState.Longs(spec.Window)], spec.Window));
        var error = Assert.Throws<InvalidDataException>(() => GuardState.FromJson(System.Text.Json.Nodes.JsonNode.Parse("""{"step": 3}""")!, "manifest of step 3"));
        Assert.Contains("manifest of step 3: \"step_guard\" is not a step guard state", error.Message);
    }
}
