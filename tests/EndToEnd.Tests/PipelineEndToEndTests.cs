// Pipeline-parallel jobs with real processes: workers each train one stage of a dp × pp job to completion, and the
// result equals a single-process run of the same spec — per-step losses and the final weights, which rank 0 of the
// pipeline job wrote from the whole model loaded out of the committed final checkpoint.
using System.Diagnostics;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace DeepSeekCluster.EndToEnd.Tests;

/// <summary>One cluster for the class: services started once, the corpus prepared once, the single-process reference trained once.</summary>
public sealed class PipelineFixture(IMessageSink sink) : IAsyncLifetime
{
    public const int SeqLen = 32, VocabSize = 512, Steps = 12, GlobalBatch = 8, MicroBatch = 2, CheckpointInterval = 4;
    public ChaosCluster Cluster { get; private set; } = null!;
    public string DatasetId { get; private set; } = "";
    /// <summary>The same spec with pp = 1 on one worker: the single-process trainer.</summary>
    public PipelineRun Reference { get; private set; } = null!;
    public string RunDir { get; } = Directory.CreateTempSubdirectory("e2e-pipeline-").FullName;
    public ITestOutputHelper? Output { get; set; }
    ClusterTestLock? clusterLock;

    public void Log(string message)
    {
        var line = $"{DateTime.UtcNow:HH:mm:ss.fff} {message}";
        try { Output?.WriteLine(line); } catch (InvalidOperationException) { } // no test running right now
        sink.OnMessage(new DiagnosticMessage(line));
    }

    public async Task InitializeAsync()
    {
        clusterLock = await ClusterTestLock.AcquireAsync("pipeline end-to-end tests");
        Cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = RunDir, Log = Log }, CancellationToken.None);
        DatasetId = await Cluster.PrepareCorpusAsync(SeqLen, VocabSize, CancellationToken.None);
        Reference = await RunJobAsync("pp-reference", pp: 1, workers: 1);
    }

    /// <summary>Starts <paramref name="workers"/> workers, runs the spec with <paramref name="pp"/> stages on them to completion, stops them.</summary>
    public async Task<PipelineRun> RunJobAsync(string name, int pp, int workers, Func<string, List<string>, Task>? whileRunning = null)
    {
        var ct = CancellationToken.None;
        var started = Enumerable.Range(0, workers).Select(_ => Cluster.AddWorker()).ToList();
        try
        {
            await Cluster.WaitForIdleWorkersAsync(started, TimeSpan.FromMinutes(5), ct);
            using var http = new HttpClient { BaseAddress = new Uri(Cluster.RestUrl), Timeout = TimeSpan.FromSeconds(100) };
            var spec = new
            {
                name, modelPreset = "tiny", dataset = DatasetId, parallel = new { dp = 0, pp },
                globalBatch = GlobalBatch, microBatch = MicroBatch, seqLen = SeqLen, steps = Steps,
                schedule = new { kind = "cosine", peakLr = 3e-3, minLr = 3e-4, warmupSteps = 1 },
                checkpointInterval = CheckpointInterval, minWorkers = workers, maxWorkers = workers, seed = 1234,
            };
            using (var request = new HttpRequestMessage(HttpMethod.Post, "/jobs") { Content = JsonContent.Create(spec) })
            {
                request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", Cluster.Token);
                using var response = await http.SendAsync(request, ct);
                if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"the coordinator refused {name}: {await response.Content.ReadAsStringAsync(ct)}");
            }
            if (whileRunning is not null) await whileRunning(name, started);
            var (job, modelFile) = await Cluster.WaitForCompletionAsync(name, TimeSpan.FromMinutes(8), ct);
            // Every step's loss as the Coordinator recorded it (GET /jobs/{id} keeps the whole history of a short job).
            using var status = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{name}", ct));
            var losses = status.RootElement.GetProperty("loss").EnumerateArray()
                .OrderBy(p => p.GetProperty("step").GetInt64()).Select(p => p.GetProperty("loss").GetDouble()).ToList();
            Log($"{name}: {job.Describe()}");
            return new PipelineRun(job, losses, ModelWeights.Read(modelFile));
        }
        finally { await Cluster.StopWorkersAsync(); }
    }

    public async Task DisposeAsync()
    {
        try
        {
            if (Cluster is not null) await Cluster.DisposeAsync();
            try { Directory.Delete(RunDir, true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
        finally { clusterLock?.Dispose(); }
    }
}

public sealed record PipelineRun(JobView Job, List<double> Losses, ModelWeights Model);

public class PipelineEndToEndTests : IClassFixture<PipelineFixture>
{
    const int Steps = PipelineFixture.Steps, GlobalBatch = PipelineFixture.GlobalBatch;

    /// <summary>
    /// Float32 cut into two stages sums in another order than one process at the stage boundary (the first stage's
    /// embedding gradient from the layers and from the MTP modules, the clip's global norm summed stage by stage), so
    /// losses agree to a few float32 ulps per step, not bitwise (replicas are exact: ExactGradientSum); a wrong batch,
    /// stage or step moves them by far more (a step's loss changes by ~1e-2 from one step to the next here).
    /// </summary>
    const double LossTolerance = 2e-4;
    /// <summary>
    /// Weights after those few-ulp differences per step: Adam divides by √v, so such a change moves a weight by at most
    /// about lr·(relative gradient change) per step, far below 1e-3 of a weight's scale over these steps, while a wrong
    /// resume moves weights by lr-sized amounts, ≳ 1e-2 of the scale.
    /// </summary>
    const double WeightTolerance = 1e-3;

    readonly PipelineFixture fx;
    readonly ITestOutputHelper output;

    public PipelineEndToEndTests(PipelineFixture fx, ITestOutputHelper output)
    {
        this.fx = fx;
        this.output = output;
        fx.Output = output;
    }

    /// <summary>dp 1 × pp 2 on two workers, dp 2 × pp 2 on four.</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public async Task ReplicasOfTwoPipelineStagesMatchTheSingleProcessRunAndItsWeights(int dp)
    {
        var run = await RunAsync($"pp-{dp}x2", pp: 2, workers: 2 * dp);
        Assert.Contains(run.Job.OfKind("formed"), e => e.Message.Contains($"{2 * dp} workers (dp {dp} × pp 2)"));
        Assert.Equal(1, run.Job.Generation);
        // Every rank reports the whole global batch's loss (the replicas average theirs), so the losses compare at any dp.
        AssertCompletedLikeTheReference(run, files: 2 * dp);
        // The manifest rank 0 read for the end of the run records the layout the stages saved.
        await fx.Cluster.WaitForLineAsync(l => l.Contains($"loaded the whole model from committed step {Steps} (saved as dp {dp} x pp 2)"), TimeSpan.FromMinutes(1),
                                          "rank 0 loading the final checkpoint", CancellationToken.None);
    }

    [Fact]
    public async Task AStageKilledMidRunReformsWithASpareAndEveryStageResumesFromTheCommittedCheckpoint()
    {
        long killedAtStep = 0;
        // Two members and a spare (the job is at maxWorkers, so the spare waits free until a member is lost).
        var run = await RunAsync("pp-kill", pp: 2, workers: 2, async (job, workers) =>
        {
            string spare = fx.Cluster.AddWorker();
            await fx.Cluster.WaitForIdleWorkersAsync([spare], TimeSpan.FromMinutes(5), CancellationToken.None);
            // After the first committed checkpoint (step 4), while the job runs; the stage-1 member is rank 1.
            var view = await fx.Cluster.WaitForAsync(job, j => j.CommittedSteps.Contains(PipelineFixture.CheckpointInterval) && j.Step > PipelineFixture.CheckpointInterval,
                                                     TimeSpan.FromMinutes(6), "the first commit of the pipeline job", CancellationToken.None, poll: TimeSpan.FromMilliseconds(50));
            killedAtStep = view.Step;
            string victim = view.Workers.Single(w => w.Rank == 1).WorkerId;
            output.WriteLine($"SIGKILL {victim} (stage 1) at step {view.Step}");
            Process.GetProcessById(fx.Cluster.Pid(victim)).Kill(); // SIGKILL: no goodbye
        });
        // The kill landed in the running job (possibly after its last step, before the final commit, when the uploads lag
        // the steps): the member was lost and a new generation finished the job.
        output.WriteLine($"killed at step {killedAtStep}");
        Assert.Single(run.Job.OfKind("worker_lost"));
        // Generation 2: the survivor and the spare. The spare holds no stage-1 state, so no stage may continue from live
        // state alone: every stage loaded the committed checkpoint, and the steps after it were redone.
        var resumed = run.Job.OfKind("resumed").Where(e => e.Generation >= 2).ToList();
        Assert.NotEmpty(resumed);
        Assert.All(resumed, e => Assert.Equal("checkpoint", e.ResumeSource));
        Assert.True(run.Job.Generation >= 2);
        AssertCompletedLikeTheReference(run, files: 2);
    }

    [Fact]
    public async Task AStageThatStopsRespondingIsReplacedAndItsNeighbourIsAbortedNotLeftWaitingOnTheLink()
    {
        DateTime stoppedAt = default;
        string? victim = null;
        var run = await RunAsync("pp-stall", pp: 2, workers: 2, async (job, workers) =>
        {
            string spare = fx.Cluster.AddWorker();
            await fx.Cluster.WaitForIdleWorkersAsync([spare], TimeSpan.FromMinutes(5), CancellationToken.None);
            // Early (step 2 of 12), so that the stages are mid-step and not past their last one whatever the machine's speed.
            var view = await fx.Cluster.WaitForAsync(job, j => j.Step >= 2, TimeSpan.FromMinutes(6), "step 2 of the pipeline job", CancellationToken.None,
                                                     poll: TimeSpan.FromMilliseconds(50));
            victim = view.Workers.Single(w => w.Rank == 1).WorkerId;
            output.WriteLine($"SIGSTOP {victim} (stage 1) at step {view.Step}");
            stoppedAt = DateTime.UtcNow;
            fx.Cluster.Signal(victim, Signals.Stop); // alive but silent: its links stay open and send nothing
            // Stage 0 is blocked on a link to the silent stage. The job re-forms when the heartbeats stop, and the rescale
            // cancels stage 0's run, which aborts the links after the grace instead of waiting out their timeout.
            await fx.Cluster.WaitForLineAsync(l => l.Contains("run cancelled at step") || l.Contains("run aborted at step"), TimeSpan.FromMinutes(3),
                                              "stage 0's run ending after the rescale", CancellationToken.None, since: stoppedAt);
        });
        Assert.Contains(run.Job.OfKind("worker_hung"), e => e.WorkerId == victim);
        Assert.DoesNotContain("sent or accepted nothing within", fx.Cluster.RecentLines(20000)); // no link waited out its timeout
        // The spare holds no stage-1 state: the stages went back together, to the committed checkpoint or the start.
        var resumed = run.Job.OfKind("resumed").Where(e => e.Generation >= 2).ToList();
        Assert.NotEmpty(resumed);
        Assert.All(resumed, e => Assert.Contains(e.ResumeSource, new[] { "checkpoint", "start" }));
        AssertCompletedLikeTheReference(run, files: 2);
    }

    async Task<PipelineRun> RunAsync(string name, int pp, int workers, Func<string, List<string>, Task>? whileRunning = null)
    {
        try { return await fx.RunJobAsync(name, pp, workers, whileRunning); }
        catch
        {
            output.WriteLine(fx.Cluster.RecentLines(300));
            throw;
        }
    }

    void AssertCompletedLikeTheReference(PipelineRun run, int files)
    {
        var job = run.Job;
        Assert.Equal(Steps, job.Step);
        Assert.Contains((long)Steps, job.CommittedSteps);
        // Every stage of every replica wrote its own file of the final checkpoint: all are in the commit.
        Assert.Contains(job.OfKind("checkpoint_committed"), e => e.Message.StartsWith($"checkpoint at step {Steps} committed: {files} files"));
        // Every stage of a replica trained the same slice; only stage 0 reported it: every sample once, no gap.
        var consumption = job.Consumption!;
        Assert.True(consumption.Complete, $"the ledger is not complete: {consumption}");
        Assert.Equal(((long)Steps * GlobalBatch, 0L), (consumption.Samples, consumption.Overlaps));

        // The loss fell, and step by step it is the single process's.
        var reference = fx.Reference.Losses;
        Assert.Equal(Steps, run.Losses.Count);
        Assert.True(run.Losses[^1] < run.Losses[0] - 0.3, $"loss went from {run.Losses[0]} to {run.Losses[^1]}");
        for (int s = 0; s < Steps; s++)
        {
            output.WriteLine($"step {s + 1}: single process {reference[s]:R}, pipeline {run.Losses[s]:R}");
            Assert.True(Math.Abs(run.Losses[s] - reference[s]) <= LossTolerance * reference[s], $"step {s + 1}: pipeline {run.Losses[s]}, single process {reference[s]}");
        }

        // The committed final checkpoint, loaded into one model by rank 0, equals the single process's model.
        var diff = ModelWeights.Compare(fx.Reference.Model, run.Model);
        output.WriteLine($"pipeline model against the single-process model: {diff}");
        Assert.Empty(diff.Mismatched);
        Assert.True(diff.Beyond(WeightTolerance).Count == 0, $"tensors beyond {WeightTolerance:E0} of their scale: {diff}");
    }
}
