// Population-based training: the exploit/explore rule against an independent implementation written here from
// docs/studies.md, and the study grain on a real (in-process) silo: a bottom trial's job is replaced by one that starts
// from a top trial's committed checkpoint (its provenance in the events), never from a trial without one, and a silo
// restart keeps every decision.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Studies;

using static DeepSeekCluster.Coordinator.Tests.Studies.StudyGrainTests;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class PbtTests
{
    static readonly List<SearchDimension> Space =
    [
        new() { Path = "schedule.peakLr", Kind = "logUniform", Low = 1e-4, High = 1e-2 }, // above the base minLr
        new() { Path = "parallel.pp", Kind = "int", Low = 1, High = 6 },
        new() { Path = "schedule.kind", Kind = "choice", Values = [.. new[] { "\"cosine\"", "\"wsd\"", "\"constant\"" }.Select(v => System.Text.Json.JsonDocument.Parse(v).RootElement)] },
    ];

    /// <summary>
    /// The rule as the docs state it, written independently: rank = trials scoring better (ties: lower index); top = rank
    /// below k, bottom = rank at least n − k, k = max(1, ⌊n·quantile⌋); the donor uniformly among top trials with a
    /// checkpoint (best first), then per dimension a resample draw or a perturbation, all from one generator.
    /// </summary>
    static (int Donor, double[] Values)? Reference(StudySpec spec, Dictionary<int, double> scores, int trial, long boundary,
        ISet<int> checkpointed, Func<int, double[]> valuesOf)
    {
        int n = scores.Count;
        if (n < 2) return null;
        int k = Math.Max(1, (int)(n * spec.Scheduler.Quantile));
        int Rank(int i) => scores.Count(o => o.Value < scores[i] || o.Value == scores[i] && o.Key < i);
        if (Rank(trial) < k || Rank(trial) < n - k) return null;
        var donors = scores.Keys.Where(i => Rank(i) < k && checkpointed.Contains(i)).OrderBy(Rank).ToArray();
        if (donors.Length == 0) return null;
        var random = new Random(unchecked(spec.Sampler.Seed * 1_000_003 + trial * 7_919 + (int)boundary * 104_729 + 0x0BB7));
        int donor = donors[random.Next(donors.Length)];
        var from = valuesOf(donor);
        var values = new double[from.Length];
        for (int i = 0; i < from.Length; i++)
        {
            var d = spec.Space[i];
            var s = spec.Scheduler;
            if (random.NextDouble() < s.ResampleProbability)
            {
                values[i] = d.Kind switch
                {
                    "logUniform" => Math.Exp(Math.Log(d.Low) + random.NextDouble() * (Math.Log(d.High) - Math.Log(d.Low))),
                    "int" => Math.Min(Math.Floor(Math.Ceiling(d.Low) + random.NextDouble() * (Math.Floor(d.High) - Math.Ceiling(d.Low) + 1)), Math.Floor(d.High)),
                    _ => random.Next(d.Values.Count),
                };
            }
            else if (d.Kind == "choice")
            {
                int step = random.Next(2) == 0 ? -1 : 1;
                values[i] = Math.Min(Math.Max(from[i] + step, 0), d.Values.Count - 1);
            }
            else
            {
                double v = from[i] * s.PerturbFactors[random.Next(s.PerturbFactors.Length)];
                v = v < d.Low ? d.Low : v > d.High ? d.High : v;
                values[i] = d.Kind == "int" ? Math.Min(Math.Max(Math.Round(v), d.Low), d.High) : v;
            }
        }
        return (donor, values);
    }

    static StudySpec Spec(double quantile, int seed = 3) => new()
    {
        Job = TestSpecs.Tiny(1, 1, steps: 8),
        Space = Space,
        Budget = new StudyBudget { Trials = 3 }, Concurrency = 3,
        Sampler = new SamplerSpec { Kind = "random", Seed = seed },
        Scheduler = new SchedulerSpec { Kind = "pbt", PerturbationInterval = 2, Quantile = quantile, PerturbFactors = [0.5, 0.8, 2.0], ResampleProbability = 0.3 },
    };

    [Fact]
    public void ExploitAndExploreFollowTheRuleExactlyAndNeverCopyATrialWithoutACheckpoint()
    {
        var random = new Random(42);
        int moves = 0, refusedForCheckpoint = 0;
        for (int c = 0; c < 500; c++)
        {
            var spec = Spec(new[] { 0.2, 0.25, 0.5 }[random.Next(3)], seed: random.Next(100));
            int n = random.Next(1, 13);
            var scores = Enumerable.Range(0, n).ToDictionary(i => i, _ => Math.Round(random.NextDouble() * 4, 1)); // ties happen
            var values = Enumerable.Range(0, n).ToDictionary(i => i, _ => new[] { StudySamplers.Draw(Space[0], random), random.Next(1, 7), random.Next(3) * 1.0 });
            var checkpointed = Enumerable.Range(0, n).Where(_ => random.NextDouble() < 0.6).ToHashSet();
            int trial = random.Next(n);
            long boundary = 2 * random.Next(1, 4);

            var expected = Reference(spec, scores, trial, boundary, checkpointed, i => values[i]);
            var actual = Pbt.Decide(spec, scores, trial, boundary, checkpointed.Contains, i => values[i]);
            Assert.Equal(expected is null, actual is null);
            if (actual is null)
            {
                if (Reference(spec, scores, trial, boundary, Enumerable.Range(0, n).ToHashSet(), i => values[i]) is not null) refusedForCheckpoint++;
                continue;
            }
            moves++;
            Assert.Equal(expected!.Value.Donor, actual.Donor);
            Assert.Contains(actual.Donor, checkpointed);
            Assert.Equal(expected.Value.Values, actual.Values); // to the bit
        }
        // Both branches were exercised many times.
        Assert.True(moves > 50 && refusedForCheckpoint > 20, $"{moves} moves, {refusedForCheckpoint} refused for want of a checkpoint");
    }

    [Fact]
    public void StartFromAndThePbtSettingsAreValidatedNamingTheField()
    {
        var job = TestSpecs.Tiny(1, 1, steps: 8);
        Assert.Contains((job with { StartFrom = new CheckpointRef("a b", 2) }).Validate(), p => p.Field == "startFrom" && p.Message.Contains("'a b'"));
        Assert.Contains((job with { StartFrom = new CheckpointRef("src", 8) }).Validate(), p => p.Field == "startFrom" && p.Message.Contains("between 1 and steps - 1 (7)"));
        Assert.Empty((job with { StartFrom = new CheckpointRef("src", 7) }).Validate());
        var bad = Spec(0.7) with { Scheduler = new SchedulerSpec { Kind = "pbt", PerturbationInterval = 8, Quantile = 0.7, PerturbFactors = [], ResampleProbability = 2 } };
        Assert.Equal(["scheduler.perturbationInterval", "scheduler.perturbFactors", "scheduler.quantile", "scheduler.resampleProbability"],
            bad.Validate().Select(p => p.Field).Order());
    }

    [Fact]
    public async Task ABottomTrialContinuesFromATopTrialsCommittedCheckpointWithPerturbedValuesAndARestartKeepsIt()
    {
        string folder = TestSpecs.TempFolder();
        var spec = Spec(quantile: 0.34) with { Space = [Space[0]] };
        StudyStatus before;
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            foreach (var w in new[] { "w1", "w2", "w3" }) await c.Worker(w).RegisterAsync(TestSpecs.Worker(w), null);
            var study = c.Grains.GetGrain<IStudyGrain>("pbt");
            var created = await study.CreateAsync(SyntheticStudies.Json(spec));
            Assert.Equal(["pbt-t000", "pbt-t001", "pbt-t002"], created.Trials.Select(t => t.JobId));
            var t0 = (await RunningAsync(c, "pbt-t000")).Spec!;
            Assert.Equal((2, 2, 0), (t0.EvalInterval, t0.CheckpointInterval, t0.KeepLast));

            // Trial 1 is the bottom of two, but trial 0, the top, has no committed checkpoint: nothing is copied.
            await ValidateAsync(c, "pbt-t000", 2, 5.0);
            await study.WakeAsync();
            await ValidateAsync(c, "pbt-t001", 2, 6.0);
            await study.WakeAsync();
            var s = await study.GetStatusAsync();
            Assert.Equal("pbt-t001", s.Trials[1].JobId);
            Assert.Contains(s.Events, e => e.Contains("trial 1 at step 2 is in the bottom quantile, but no top trial (0) has a committed checkpoint"));
            Assert.Equal(JobState.Running, (await c.Job("pbt-t001").GetStatusAsync()).State);
            // Nor does a job accept a start from a checkpoint that is not committed.
            var refused = await Assert.ThrowsAsync<JobSpecInvalidException>(() =>
                c.Job("stray").SubmitAsync(TestSpecs.Tiny(1, 1, steps: 8) with { StartFrom = new CheckpointRef("pbt-t000", 2) }));
            Assert.Contains(refused.Problems, p => p.Field == "startFrom" && p.Message.Contains("no committed checkpoint of step 2"));

            // Trial 0 commits step 2; trial 2 arrives last of three: it copies trial 0's checkpoint and perturbs its lr.
            await c.Job("pbt-t000").CheckpointCommittedAsync(new CommittedCheckpoint(2, 1, 1, 100));
            await study.WakeAsync();
            await ValidateAsync(c, "pbt-t002", 2, 7.0);
            await study.WakeAsync();
            s = await study.GetStatusAsync();
            Assert.Equal("pbt-t002-p1", s.Trials[2].JobId);
            Assert.Equal(JobState.Stopped, (await c.Job("pbt-t002").GetStatusAsync()).State);
            var scores = new Dictionary<int, double> { [0] = 5, [1] = 6, [2] = 7 };
            var expected = Reference(spec, scores, 2, 2, new HashSet<int> { 0 }, _ => [t0.Schedule.PeakLr])!.Value;
            Assert.Equal(0, expected.Donor);
            var successor = await RunningAsync(c, "pbt-t002-p1");
            Assert.Equal(new CheckpointRef("pbt-t000", 2), successor.Spec!.StartFrom);
            Assert.Equal(expected.Values[0], successor.Spec.Schedule.PeakLr);
            Assert.NotEqual(t0.Schedule.PeakLr, successor.Spec.Schedule.PeakLr);
            // Provenance: the study names trial, job and step; the job its source; its first generation loads step 2, and
            // its ledger starts with the source's two steps.
            Assert.Contains(s.Events, e => e.Contains("trial 2 at step 2") && e.Contains("exploits trial 0: job pbt-t002-p1 starts from the committed checkpoint of job pbt-t000 (trial 0) at step 2"));
            var started = Assert.Single(successor.Events, e => e.Kind == JobEventKinds.StartedFrom);
            Assert.Equal(("pbt-t000@2", 2L), (started.Reason, started.ResumeStep));
            Assert.Equal(2, (await c.Worker(successor.Workers.Single().WorkerId).GetAsync()).Assignment!.ResumeStep);
            Assert.Equal([[0L, 16L]], successor.Consumption.Ranges);
            Assert.Equal(2, successor.Step);
            before = s;
        }

        await using (var c = await GrainCluster.StartAsync(folder))
        {
            var after = await c.Grains.GetGrain<IStudyGrain>("pbt").GetStatusAsync();
            Assert.Equal(before.Trials.Select(t => (t.JobId, t.State, t.Parameters["schedule.peakLr"], t.Step)),
                         after.Trials.Select(t => (t.JobId, t.State, t.Parameters["schedule.peakLr"], t.Step)));
            Assert.Equal(before.Events, after.Events.Take(before.Events.Length));
        }
    }
}
