// ASHA against a small independent implementation of its rule, decision by decision, on an asynchronous simulated study.
using DeepSeekCluster.Coordinator.Studies;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class AshaTests
{
    /// <summary>
    /// The rule as the paper's stopping variant states it, written apart from AshaRungs: continue when the rung holds no
    /// earlier result, else when the result is at most the 1/η quantile (linear interpolation between order statistics)
    /// of the earlier results.
    /// </summary>
    static bool ReferenceContinues(List<double> earlier, double result, int eta)
    {
        if (earlier.Count == 0) return true;
        var sorted = earlier.OrderBy(x => x).ToList();
        double h = (sorted.Count - 1) / (double)eta;
        int i = (int)h;
        double cutoff = i + 1 < sorted.Count ? sorted[i] + (h - i) * (sorted[i + 1] - sorted[i]) : sorted[i];
        return result <= cutoff;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void TheRungsFollowThePromotionRuleExactlyAndTheStudyFindsTheOptimum(int seed)
    {
        var spec = SyntheticStudies.Spec("random", seed, "asha", trials: 60);
        long[] rungSteps = spec.Scheduler.Rungs(spec.Job!.Steps);
        Assert.Equal([10L, 30], rungSteps); // grace 10, η 3, below max 90
        var rungs = AshaRungs.For(rungSteps, 3);
        var reference = rungSteps.Select(_ => new List<double>()).ToArray();

        // Four workers; each trial runs at its own speed, so trials reach the rungs out of order (asynchronous promotion).
        var speeds = new Random(seed);
        var running = new PriorityQueue<(int Trial, long Step, double Lr, double Wd, double Speed), double>();
        var finals = new List<(double Lr, double Wd, double Loss)>();
        int started = 0, decisions = 0, stopped = 0;
        void Start(double now)
        {
            var v = StudySamplers.Propose(spec, started, [])!;
            double speed = 0.5 + speeds.NextDouble();
            running.Enqueue((started++, 10, v[0], v[1], speed), now + 10 / speed);
        }
        for (int w = 0; w < 4; w++) Start(0);
        while (running.TryDequeue(out var t, out double now))
        {
            double loss = SyntheticStudies.At(t.Lr, t.Wd, t.Step);
            int k = Array.IndexOf(rungSteps, t.Step);
            bool goOn = true;
            if (k >= 0)
            {
                bool expected = ReferenceContinues(reference[k], loss, 3);
                reference[k].Add(loss);
                goOn = rungs.Continues(k, t.Trial, loss);
                Assert.True(expected == goOn, $"trial {t.Trial} at rung {k} (loss {loss}): reference says {(expected ? "continue" : "stop")}");
                decisions++;
            }
            if (!goOn) stopped++;
            else if (t.Step == 90) finals.Add((t.Lr, t.Wd, loss));
            else { running.Enqueue(t with { Step = t.Step + 10 }, now + 10 / t.Speed); continue; }
            if (started < spec.Budget.Trials) Start(now);
        }

        Assert.Equal(60, started);
        Assert.True(stopped >= 30, $"ASHA stopped only {stopped} of 60 trials");
        // Rung 0 lets about 1/η through; every trial reached it.
        Assert.Equal(60, rungs.Recorded[0].Count);
        Assert.True(decisions > 60);
        var best = finals.MinBy(f => f.Loss);
        Assert.InRange(Math.Log10(best.Lr), -3.5, -2.5);
        Assert.InRange(best.Wd, 0.0, 0.25);
    }

    [Fact]
    public void TheFirstResultAtARungAlwaysContinuesAndTheCutoffInterpolates()
    {
        var rungs = AshaRungs.For([10], 4);
        Assert.Null(rungs.Cutoff(0));
        Assert.True(rungs.Continues(0, 0, 100));  // alone at the rung
        Assert.False(rungs.Continues(0, 1, 101)); // worse than the only earlier result
        Assert.True(rungs.Continues(0, 2, 5));
        // Earlier: 5, 100, 101 → position (3 − 1)/4 = 0.5 between 5 and 100.
        Assert.Equal(52.5, rungs.Cutoff(0));
        Assert.Throws<InvalidOperationException>(() => rungs.Continues(0, 2, 1));
    }
}
