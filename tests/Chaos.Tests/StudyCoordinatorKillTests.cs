// A real study on the tiny preset, with real processes: ASHA over four learning rates (two clearly bad), two workers,
// and a Coordinator SIGKILLed and restarted while a trial trains. The study must lose and duplicate nothing across the
// kill, stop a bad trial at its rung by ASHA's rule, and name a good learning rate as its best.
//
// Deterministic by construction: one trial at a time (concurrency 1, each trial on both workers), a grid sampler (trial
// i gets value i), and training that is bit-reproducible for a given seed and world size, so every rung result and so
// every ASHA decision is fixed. The kill lands wherever the running trial happens to be: training goes on peer to peer
// while the Coordinator is down and the workers' reports wait in their outbox, so the study sees the same points
// afterwards; nothing asserted depends on where exactly it landed.
using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;
using Xunit.Abstractions;

namespace DeepSeekCluster.Chaos.Tests;

public sealed class StudyCoordinatorKillTests(ITestOutputHelper output)
{
    const int SeqLen = 32, VocabSize = 512, Steps = 8, GracePeriod = 4, Eta = 2;
    // Trial i trains with Rates[i]. The good rate first: the first result at a rung always continues, so the bad ones
    // after it are judged against it.
    static readonly double[] Rates = [3e-3, 1e-6, 1e-1, 1e-3];
    const string Lr = "schedule.peakLr";
    static readonly TimeSpan Generous = TimeSpan.FromMinutes(6);

    [Fact]
    public async Task StudySurvivesACoordinatorKillAndAshaStopsTheBadLearningRates()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("study coordinator kill");
        var started = DateTime.UtcNow; // after the lock: another suite's cluster may hold it for minutes
        var runDir = Directory.CreateTempSubdirectory("chaos-study-").FullName;
        void Log(string m) { try { output.WriteLine($"{DateTime.UtcNow:HH:mm:ss.fff} {m}"); } catch (InvalidOperationException) { } }
        var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = runDir, Log = Log }, CancellationToken.None);
        using var http = new HttpClient { BaseAddress = new Uri(cluster.RestUrl), Timeout = TimeSpan.FromSeconds(100) };
        const string studyId = "chaos-study";
        try
        {
            var dataset = await cluster.PrepareCorpusAsync(SeqLen, VocabSize, CancellationToken.None);
            var workers = new[] { cluster.AddWorker(), cluster.AddWorker() };
            await cluster.WaitForIdleWorkersAsync(workers, Generous, CancellationToken.None);
            await CreateStudyAsync(http, cluster.Token, studyId, dataset);
            var created = DateTime.UtcNow;

            // Held until a rung result is recorded and a later trial is drawn and running: the kill then falls between
            // sampler draws, rung results and a trial's training, all of which must survive it.
            var before = await WaitForStudyAsync(http, studyId, s => s.Rungs[0].Results >= 1 && s.Trials.Length >= 2 && s.Trials.Any(t => t.State == TrialState.Running),
                                                 "a rung result and a second trial running", cluster);
            Log($"before the kill:\n{Describe(before)}");
            int oldPid = cluster.Pid("coordinator");
            await cluster.KillCoordinatorAsync(CancellationToken.None);
            Assert.False(File.Exists($"/proc/{oldPid}/cmdline") && File.ReadAllText($"/proc/{oldPid}/cmdline").Contains("Coordinator"),
                         $"the killed coordinator (pid {oldPid}) is still there");
            await cluster.RestartCoordinatorAsync(CancellationToken.None);

            var after = await WaitForStudyAsync(http, studyId, s => s.State != StudyState.Running, "the study's end", cluster);
            Log($"after:\n{Describe(after)}\nthe study took {(DateTime.UtcNow - created).TotalSeconds:F1} s, the test {(DateTime.UtcNow - started).TotalSeconds:F1} s");
            Assert.Equal(StudyState.Completed, after.State);

            // Nothing the study knew before the kill is lost, changed or drawn again.
            foreach (var b in before.Trials)
            {
                var a = Assert.Single(after.Trials, t => t.Index == b.Index);
                Assert.Equal(b.JobId, a.JobId);
                Assert.Equal(b.Parameters, a.Parameters);
                Assert.True(a.Curve.Length >= b.Curve.Length && a.Curve.Take(b.Curve.Length).SequenceEqual(b.Curve),
                            $"trial {b.Index}'s curve before the kill [{string.Join(", ", b.Curve)}] is not the start of the one after [{string.Join(", ", a.Curve)}]");
                if (b.State != TrialState.Running) Assert.Equal((b.State, b.StoppedAtRung), (a.State, a.StoppedAtRung));
            }
            for (int k = 0; k < before.Rungs.Length; k++) Assert.True(after.Rungs[k].Results >= before.Rungs[k].Results, $"rung {k} lost results");
            // Each event of the study before the kill is still there, in order (the draws among them).
            Assert.Equal(before.Events, after.Events.Take(before.Events.Length));
            // Every trial was drawn once, with the grid's value for its index, and ran as exactly one job.
            Assert.Equal(Enumerable.Range(0, Rates.Length), after.Trials.Select(t => t.Index));
            for (int i = 0; i < Rates.Length; i++)
            {
                Assert.Equal(Rates[i], LrOf(after.Trials[i]), 12);
                Assert.Single(after.Events, e => e.Contains($" trial {i} ({after.Trials[i].JobId}):", StringComparison.Ordinal));
            }
            var studyJobs = await StudyJobsAsync(http, studyId);
            Assert.Equal(after.Trials.Select(t => t.JobId).Order(), studyJobs.Order());
            // Every trial job's spec, as the restarted Coordinator read it back from its grain state, is the one submitted
            // (trial 0 ended before the kill, so its spec comes from storage). minLr 0 once came back as its initializer's 3e-5.
            foreach (var t in after.Trials)
            {
                using var job = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{t.JobId}"));
                var schedule = job.RootElement.GetProperty("spec").GetProperty("schedule");
                Assert.True(schedule.GetProperty("minLr").GetDouble() == 0 && schedule.GetProperty("peakLr").GetDouble() == Rates[t.Index],
                            $"{t.JobId}'s schedule after the restart is {schedule.GetRawText()}, not peakLr {Rates[t.Index]} and minLr 0 as submitted");
            }

            // ASHA, recomputed here from the curves: trials ran one after another, so trial i is judged at the rung
            // against the results of trials 0..i-1 there; it stops iff its result is above their 1/η quantile.
            long rung = GracePeriod;
            Assert.Equal(new[] { rung }, after.Rungs.Select(r => r.Step));
            var atRung = new List<double>();
            foreach (var t in after.Trials)
            {
                double result = t.Curve.First(p => p.Step >= rung).Loss;
                bool stops = atRung.Count > 0 && result > Percentile(atRung, 1.0 / Eta);
                Assert.True(stops == (t.State == TrialState.Pruned),
                            $"trial {t.Index} (lr {LrOf(t)}): {result:G6} at step {rung} against [{string.Join(", ", atRung.Select(x => x.ToString("G6", CultureInfo.InvariantCulture)))}] should {(stops ? "" : "not ")}stop; it is {t.State}");
                if (stops) Assert.Equal(0, t.StoppedAtRung);
                else Assert.Equal((TrialState.Completed, (long)Steps), (t.State, t.Curve[^1].Step));
                atRung.Add(result);
            }
            Assert.Equal(after.Trials.Length, after.Rungs[0].Results);
            Assert.Contains(after.Trials, t => t.State == TrialState.Pruned && LrOf(t) is 1e-6 or 1e-1);
            Assert.NotNull(after.Best);
            double best = LrOf(after.Best!);
            Assert.True(best is >= 1e-3 and <= 1e-2, $"the best trial trained with lr {best}, outside [1e-3, 1e-2]:\n{Describe(after)}");
        }
        finally
        {
            try { await PostAsync(http, cluster.Token, $"/studies/{studyId}/stop", null); } catch (HttpRequestException) { } catch (TaskCanceledException) { }
            await cluster.StopWorkersAsync();
            await cluster.DisposeAsync();
            try { Directory.Delete(runDir, true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    static async Task CreateStudyAsync(HttpClient http, string token, string id, string dataset)
    {
        var spec = new
        {
            name = id,
            job = new
            {
                modelPreset = "tiny", dataset, parallel = new { dp = 0, pp = 1 }, globalBatch = 4, microBatch = 2, seqLen = SeqLen, steps = Steps,
                schedule = new { kind = "cosine", peakLr = 3e-3, minLr = 0.0, warmupSteps = 1 },
                checkpointInterval = 0, minWorkers = 2, maxWorkers = 2, seed = 1234,
            },
            space = new[] { new { path = Lr, kind = "grid", values = Rates } },
            metric = "validationLoss", mode = "min",
            budget = new { trials = Rates.Length },
            concurrency = 1,
            sampler = new { kind = "grid", seed = 1 },
            scheduler = new { kind = "asha", gracePeriod = GracePeriod, reductionFactor = Eta },
        };
        var body = await PostAsync(http, token, "/studies", JsonSerializer.Serialize(spec));
        Assert.True(body.Status == 201, $"POST /studies answered {body.Status}: {body.Text}");
    }

    static async Task<(int Status, string Text)> PostAsync(HttpClient http, string token, string path, string? json)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(json ?? "", Encoding.UTF8, "application/json") };
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
        using var response = await http.SendAsync(request);
        return ((int)response.StatusCode, await response.Content.ReadAsStringAsync());
    }

    /// <summary>Polls GET /studies/{id} until <paramref name="condition"/> holds (a Coordinator that does not answer is polled again).</summary>
    static async Task<StudyStatus> WaitForStudyAsync(HttpClient http, string id, Func<StudyStatus, bool> condition, string what, ChaosCluster cluster)
    {
        var deadline = DateTime.UtcNow + Generous;
        StudyStatus? last = null;
        while (true)
        {
            try
            {
                last = JsonSerializer.Deserialize<StudyStatus>(await http.GetStringAsync($"/studies/{id}"), JobSpecJson.Options)!;
                if (condition(last)) return last;
                if (last.State != StudyState.Running) throw new InvalidOperationException($"waiting for {what}, the study ended first:\n{Describe(last)}");
            }
            catch (HttpRequestException) { }
            catch (TaskCanceledException) { }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"{what} did not happen within {Generous.TotalMinutes} min; {(last is null ? "no answer" : Describe(last))}\n{cluster.RecentLines(40)}");
            await Task.Delay(250);
        }
    }

    static async Task<List<string>> StudyJobsAsync(HttpClient http, string studyId)
    {
        using var doc = JsonDocument.Parse(await http.GetStringAsync("/jobs"));
        return [.. doc.RootElement.EnumerateArray().Select(j => j.GetProperty("jobId").GetString()!).Where(j => j.StartsWith(studyId + "-", StringComparison.Ordinal))];
    }

    static double LrOf(TrialStatus t) => double.Parse(t.Parameters[Lr], CultureInfo.InvariantCulture);

    /// <summary>numpy.percentile's linear rule, written out again here rather than calling the Coordinator's.</summary>
    static double Percentile(IEnumerable<double> values, double q)
    {
        var s = values.Order().ToArray();
        double at = q * (s.Length - 1);
        int lo = (int)at, hi = Math.Min(lo + 1, s.Length - 1);
        return s[lo] + (s[hi] - s[lo]) * (at - lo);
    }

    static string Describe(StudyStatus s) =>
        $"study {s.StudyId}: {s.State}, best {s.Best?.JobId ?? "-"}; rungs [{string.Join(", ", s.Rungs.Select(r => $"step {r.Step}: {r.Results} results, cut-off {r.Cutoff}, {r.Stopped} stopped"))}]\n" +
        string.Join("\n", s.Trials.Select(t => $"  {t.JobId} lr {t.Parameters.GetValueOrDefault(Lr)}: {t.State} at step {t.Step}, rung {t.StoppedAtRung?.ToString() ?? "-"}, " +
                                               $"curve [{string.Join(", ", t.Curve.Select(p => $"{p.Step}:{p.Loss:G6}"))}]")) +
        "\n  events:\n    " + string.Join("\n    ", s.Events);
}
