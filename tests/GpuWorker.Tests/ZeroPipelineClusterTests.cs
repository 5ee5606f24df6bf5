// ZeRO inside pipeline stages in a cluster job: the real Coordinator (in this process) forms dp 2 x pp 2 with zero 1, and
// dp 2 x pp 2 x ep 2 with zero 2, on four real ClusterWorkers over tcp; each stage's two replicas hold half of that
// stage's replicated optimizer state (and, under ep, each its half of the routed experts with their whole state).
// Both jobs complete with a complete ledger, validate, and commit, bit for bit, the checkpoint a one-worker job of the
// same spec commits: every weight, both AdamW moments, the routing biases.
using System.Net;
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

// In ExpertParallelClusterTests' collection, for its reason: the bit-for-bit comparison needs torch's process-wide
// generator to itself while the jobs build their models.
[Collection(nameof(ExpertParallelClusterTests))]
public class ZeroPipelineClusterTests(DataShardsHostFixture fixture, ITestOutputHelper output) : IClassFixture<DataShardsHostFixture>
{
    const int Steps = 3, Workers = 4;
    DataShardsHost Data => fixture.Host;

    // Global batch 8 = 2 replicas x 2 micro-batches of 2 = 1 rank x 4 micro-batches: the exact gradient sums make both the
    // same. Unclipped and without MTP: a stage's share of the norm is summed along the pipeline, and the embedding's
    // gradient from the MTP module comes back along it, both added in another order than one process adds them.
    JobSpec Spec(string name, ParallelPlan parallel, int workers) => new()
    {
        Name = name, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 8, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
        Steps = Steps, Seed = 11, EvalInterval = Steps, CheckpointInterval = 0, Parallel = parallel, MinWorkers = workers, MaxWorkers = workers,
        Schedule = new() { WarmupSteps = 1, PeakLr = 3e-3 }, ClipNorm = 0, MtpWeight = 0,
    };

    [Fact]
    public async Task Dp2Pp2JobsWithZero1AndWithEp2Zero2CommitTheOneWorkerJobsCheckpointBitForBit()
    {
        await using var store = await StoreHost.StartAsync();
        await using var coordinator = await InProcessCoordinator.StartAsync(store.Address);
        var http = coordinator.Http;
        var scratch = Directory.CreateTempSubdirectory("zero-pp-cluster-").FullName;
        var log = new StringWriter();
        var syncLog = TextWriter.Synchronized(log);
        using var stopWorkers = new CancellationTokenSource();
        var workers = new List<Task<int>>();
        try
        {
            for (int i = 0; i < Workers; i++)
                workers.Add(new ClusterWorker(coordinator.Worker($"zero-pp-worker-{i}", Data.Address, store.Address, Path.Combine(scratch, $"w{i}")), syncLog).RunAsync(stopWorkers.Token));

            var jobs = new[] { (Zero: 1, Ep: 1), (Zero: 2, Ep: 2) }
                .Select(j => (j.Zero, j.Ep, Spec: Spec($"zero{j.Zero}-ep{j.Ep}-pp-job", new ParallelPlan { Dp = 2, Pp = 2, Ep = j.Ep, Zero = j.Zero }, Workers))).ToList();
            var statuses = new List<JobStatus>();
            foreach (var (_, _, spec) in jobs)
            {
                Assert.Empty(spec.Validate());
                statuses.Add(await RunToCompletion(http, spec, log));
            }
            var one = await RunToCompletion(http, Spec("zero-pp-reference", new ParallelPlan { Dp = 1 }, 1), log);
            string tokenizerHash = Data.Client.GetTokenizer(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId }).TokenizerHash;
            var oneTensors = await LoadWhole(store, "zero-pp-reference", jobs[0].Spec, tokenizerHash, Path.Combine(scratch, "load-one"));
            Assert.Contains(oneTensors.Keys, k => k.Contains(".mlp.experts.") && k.EndsWith(".exp_avg_sq"));
            Assert.Contains(oneTensors.Keys, k => k.EndsWith("e_score_correction_bias"));
            string text = log.ToString();

            foreach (var ((zero, ep, spec), status) in jobs.Zip(statuses))
            {
                Assert.Contains(status.Events, e => e.Kind == JobEventKinds.Formed && e.Message.Contains("4 workers"));
                Assert.True(status.Consumption.Complete, $"zero {zero} ep {ep}: the ledger is not complete: {status.Consumption}");
                Assert.Equal(((long)Steps * 8, 0L), (status.Consumption.Samples, status.Consumption.Overlaps));
                Assert.Contains($"memory plan (fp32, zero {zero}): ", text);
                Assert.Contains($"loaded the whole model from committed step 3 (saved as dp 2 x pp 2{(ep > 1 ? " x ep 2" : "")})", text);
                Assert.Contains($"model saved to the checkpoint store as exports/{spec.Name}/3/hf", text);
                Assert.Equal(one.Loss.OrderBy(p => p.Step).Select(p => p.Loss), status.Loss.OrderBy(p => p.Step).Select(p => p.Loss));
                Assert.Equal(one.ValidationLoss.Single(v => v.Step == Steps).Loss, status.ValidationLoss.Where(v => v.Step == Steps).Select(v => v.Loss).Distinct().Single());

                var tensors = await LoadWhole(store, spec.Name!, spec, tokenizerHash, Path.Combine(scratch, $"load-{spec.Name}"));
                Assert.Equal(oneTensors.Keys.Order(), tensors.Keys.Order());
                foreach (var (name, expected) in oneTensors)
                    Assert.True(expected.SequenceEqual(tensors[name]), $"{name} differs between the dp 2 x pp 2 x ep {ep} x zero {zero} job's committed checkpoint and the one-worker job's");
                output.WriteLine($"zero {zero} ep {ep}: {oneTensors.Count} tensors equal bit for bit; losses {string.Join(", ", status.Loss.Select(p => p.Loss))}");
            }
        }
        catch
        {
            output.WriteLine(log.ToString());
            throw;
        }
        finally
        {
            await stopWorkers.CancelAsync();
            foreach (var w in workers) await w.WaitAsync(TimeSpan.FromMinutes(1));
            Directory.Delete(scratch, recursive: true);
        }
    }

    static async Task<JobStatus> RunToCompletion(HttpClient http, JobSpec spec, StringWriter log)
    {
        var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(spec), System.Text.Encoding.UTF8, "application/json"));
        Assert.True(submitted.StatusCode == HttpStatusCode.Created, $"{spec.Name}: {await submitted.Content.ReadAsStringAsync()}");
        JobStatus? status = null;
        await InProcessCoordinator.Until(async () =>
        {
            status = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{spec.Name}", JobSpecJson.Options))!;
            Assert.NotEqual(JobState.Failed, status.State);
            // The end's validation and the model's upload come after the completion: wait for the upload too.
            return status.State == JobState.Completed && log.ToString().Contains($"model saved to the checkpoint store as exports/{spec.Name}/");
        }, $"job {spec.Name} completes", log);
        await InProcessCoordinator.Until(async () =>
        {
            status = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{spec.Name}", JobSpecJson.Options))!;
            return status.ValidationLoss.Any(v => v.Step == Steps);
        }, $"the final validation of {spec.Name}", log);
        Assert.Equal([(long)Steps], status!.Committed.Select(c => c.Step));
        return status;
    }

    /// <summary>The committed final step of <paramref name="job"/> loaded into one whole model and AdamW: every tensor's values by name.</summary>
    async Task<Dictionary<string, float[]>> LoadWhole(StoreHost store, string job, JobSpec spec, string tokenizerHash, string staging)
    {
        var manifest = Data.Client.GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId });
        var eos = Data.Client.GetTokenizer(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId }).EotTokenId;
        var (config, options) = JobPlan.Map(spec with { Parallel = new ParallelPlan() }, (int)manifest.VocabSize, eos);
        var checkpoints = new GrpcCheckpointStore(store.Client, store.Address, job, staging);
        using var model = new DeepSeekForCausalLM(config);
        using var optimizer = Trainer.CreateOptimizer(model, options);
        await ShardedCheckpointLoader.LoadReplicaAsync(checkpoints, Steps, model, optimizer, tokenizerHash);
        return CheckpointTensors.Collect(model, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().to_type(ScalarType.Float32).contiguous().data<float>().ToArray());
    }
}
