// TPE against random search at the same number of trials on the synthetic objective, over many seeds.
using DeepSeekCluster.Coordinator.Studies;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class TpeTests
{
    static double BestAfter(string sampler, int seed, int trials)
    {
        var spec = SyntheticStudies.Spec(sampler, seed, trials: trials);
        var history = new List<Observation>();
        for (int i = 0; i < trials; i++)
        {
            var v = StudySamplers.Propose(spec, i, history)!;
            Assert.InRange(v[0], 1e-5, 1e-1);
            Assert.InRange(v[1], 0, 0.3);
            history.Add(new Observation(v, SyntheticStudies.Final(v[0], v[1])));
        }
        return history.Min(o => o.Result);
    }

    [Fact]
    public void TpeBeatsRandomAtAnEqualBudgetOverManySeeds()
    {
        const int seeds = 40, trials = 30;
        var tpe = Enumerable.Range(1, seeds).Select(s => BestAfter("tpe", s, trials)).ToArray();
        var random = Enumerable.Range(1, seeds).Select(s => BestAfter("random", s, trials)).ToArray();
        int wins = tpe.Zip(random).Count(p => p.First < p.Second);
        string summary = $"mean excess loss over the optimum: TPE {tpe.Average() - 1:F4}, random {random.Average() - 1:F4}; TPE better in {wins} of {seeds} seeds";
        Assert.True(tpe.Average() - 1 < 0.8 * (random.Average() - 1), summary);
        Assert.True(wins >= seeds * 0.6, summary);
    }

    [Fact]
    public void TheSameSeedAndHistoryDrawTheSameTrial()
    {
        var spec = SyntheticStudies.Spec("tpe", 7);
        var history = Enumerable.Range(0, 8).Select(i => new Observation([Math.Pow(10, -5 + i * 0.5), 0.03 * i], i)).ToList();
        Assert.Equal(StudySamplers.Propose(spec, 8, history), StudySamplers.Propose(spec, 8, history));
        Assert.NotEqual(StudySamplers.Propose(spec, 8, history), StudySamplers.Propose(spec with { Sampler = spec.Sampler with { Seed = 8 } }, 8, history));
    }
}
