// A pipeline-parallel job with real processes: two workers each train one stage of a dp 1 × pp 2 job to completion,
// and the result equals a single-process run of the same spec — per-step losses and the final weights, which rank 0 of
// the pipeline job wrote from the whole model loaded out of the committed final checkpoint.
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;

namespace DeepSeekCluster.EndToEnd.Tests;

public class PipelineEndToEndTests(ITestOutputHelper output)
{
    const int SeqLen = 32, VocabSize = 512, Steps = 8, GlobalBatch = 8, MicroBatch = 2, CheckpointInterval = 4;

    /// <summary>
    /// Float32 on two stages sums in another order than one process (the stage boundary, the global-norm clip's sum), so
    /// losses agree to a few float32 ulps per step, not bitwise; a wrong batch, stage or step moves them by far more.
    /// </summary>
    const double LossTolerance = 2e-4;
    /// <summary>The chaos scenarios' bound for weights after a different summation order (see ChaosScenarioTests.Tolerance).</summary>
    const double WeightTolerance = 1e-3;

    [Fact]
    public async Task TwoWorkersTrainTwoPipelineStagesAndMatchTheSingleProcessRunAndItsWeights()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("pipeline end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-pipeline-").FullName;
        var ct = CancellationToken.None;
        var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = runDir, Log = Log }, ct);
        try
        {
            string dataset = await cluster.PrepareCorpusAsync(SeqLen, VocabSize, ct);

            // The reference: the same spec with pp = 1 on one worker, i.e. the single-process trainer.
            var reference = await RunJobAsync(cluster, "pp-reference", dataset, pp: 1, workers: 1, ct);
            var pipeline = await RunJobAsync(cluster, "pp-two-stages", dataset, pp: 2, workers: 2, ct);

            // One generation of two ranks, stage-major: rank 0 = stage 0, rank 1 = stage 1.
            Assert.Contains(pipeline.Job.OfKind("formed"), e => e.Message.Contains("2 workers (dp 1 × pp 2)"));
            Assert.Equal(1, pipeline.Job.Generation);
            Assert.Equal(Steps, pipeline.Job.Step);
            Assert.Contains((long)CheckpointInterval, pipeline.Job.CommittedSteps);
            Assert.Contains((long)Steps, pipeline.Job.CommittedSteps);
            // Both stages trained the same slice; only stage 0 reported it: every sample once.
            var consumption = pipeline.Job.Consumption!;
            Assert.True(consumption.Complete, $"the ledger is not complete: {consumption}");
            Assert.Equal(((long)Steps * GlobalBatch, 0L), (consumption.Samples, consumption.Overlaps));
            // Each stage wrote its own file of every checkpoint: both are in the commit.
            Assert.Contains(pipeline.Job.OfKind("checkpoint_committed"), e => e.Message.StartsWith($"checkpoint at step {Steps} committed: 2 files"));

            // The loss fell, and step by step it is the single process's.
            Assert.Equal(Steps, pipeline.Losses.Count);
            Assert.True(pipeline.Losses[^1] < pipeline.Losses[0] - 0.3, $"loss went from {pipeline.Losses[0]} to {pipeline.Losses[^1]}");
            for (int s = 0; s < Steps; s++)
            {
                output.WriteLine($"step {s + 1}: single process {reference.Losses[s]:R}, two stages {pipeline.Losses[s]:R}");
                Assert.True(Math.Abs(pipeline.Losses[s] - reference.Losses[s]) <= LossTolerance * reference.Losses[s],
                    $"step {s + 1}: two stages {pipeline.Losses[s]}, single process {reference.Losses[s]}");
            }

            // The committed final checkpoint, loaded into one model by rank 0, equals the single process's model.
            // (The manifest it read records the layout the stages saved.)
            await cluster.WaitForLineAsync(l => l.Contains($"loaded the whole model from committed step {Steps} (saved as dp 1 x pp 2)"), TimeSpan.FromMinutes(1),
                                           "rank 0 loading the final checkpoint", ct);
            var diff = ModelWeights.Compare(ModelWeights.Read(reference.ModelFile), ModelWeights.Read(pipeline.ModelFile));
            output.WriteLine($"pipeline model against the single-process model: {diff}");
            Assert.Empty(diff.Mismatched);
            Assert.True(diff.Beyond(WeightTolerance).Count == 0, $"tensors beyond {WeightTolerance:E0} of their scale: {diff}");
        }
        catch
        {
            output.WriteLine(cluster.RecentLines(200));
            throw;
        }
        finally
        {
            await cluster.DisposeAsync();
            try { Directory.Delete(runDir, true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    sealed record Run(JobView Job, List<double> Losses, string ModelFile);

    async Task<Run> RunJobAsync(ChaosCluster cluster, string name, string dataset, int pp, int workers, CancellationToken ct)
    {
        var started = Enumerable.Range(0, workers).Select(_ => cluster.AddWorker()).ToList();
        await cluster.WaitForIdleWorkersAsync(started, TimeSpan.FromMinutes(5), ct);
        using var http = new HttpClient { BaseAddress = new Uri(cluster.RestUrl), Timeout = TimeSpan.FromSeconds(100) };
        var spec = new
        {
            name, modelPreset = "tiny", dataset, parallel = new { dp = 0, pp },
            globalBatch = GlobalBatch, microBatch = MicroBatch, seqLen = SeqLen, steps = Steps,
            schedule = new { kind = "cosine", peakLr = 3e-3, minLr = 3e-4, warmupSteps = 1 },
            checkpointInterval = CheckpointInterval, minWorkers = workers, maxWorkers = workers, seed = 1234,
        };
        using (var request = new HttpRequestMessage(HttpMethod.Post, "/jobs") { Content = JsonContent.Create(spec) })
        {
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", cluster.Token);
            using var response = await http.SendAsync(request, ct);
            Assert.True(response.IsSuccessStatusCode, $"the coordinator refused {name}: {await response.Content.ReadAsStringAsync(ct)}");
        }
        var (job, modelFile) = await cluster.WaitForCompletionAsync(name, TimeSpan.FromMinutes(8), ct);
        // Every step's loss as the Coordinator recorded it (GET /jobs/{id} keeps the whole history of a short job).
        using var status = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{name}", ct));
        var losses = status.RootElement.GetProperty("loss").EnumerateArray()
            .OrderBy(p => p.GetProperty("step").GetInt64()).Select(p => p.GetProperty("loss").GetDouble()).ToList();
        // Copy the weights out before the workers stop (the next job's workers write into the same folder tree).
        string copy = Path.Combine(cluster.Options.RunDir, $"{name}.safetensors");
        File.Copy(modelFile, copy);
        await cluster.StopWorkersAsync();
        Log($"{name}: {job.Describe()}");
        return new Run(job, losses, copy);
    }

    void Log(string message)
    {
        try { output.WriteLine($"{DateTime.UtcNow:HH:mm:ss.fff} {message}"); } catch (InvalidOperationException) { }
    }
}
