// POST /jobs/{id}/exports end to end: the real Coordinator (in this process, as its Program starts it) orders the export
// of a committed checkpoint on a free worker (the real ClusterWorker on its control stream), which exports it from the
// real CheckpointStore into the store's exports/; the export is downloaded back and compared with the checkpoint.
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.GpuWorker.Tests;

public class CoordinatorExportTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    const string Job = "exported-job", WorkerId = "exporter-1";
    DataShardsHost Data => fixture.Host;

    [Fact]
    public async Task ACommittedStepExportedOverRestOnAFreeWorkerDownloadsBackWithTheCheckpointsWeightsAndBadRequestsAreNamed()
    {
        await using var store = await StoreHost.StartAsync();
        await using var coordinator = await InProcessCoordinator.StartAsync(store.Address);
        var http = coordinator.Http;
        var scratch = Directory.CreateTempSubdirectory("coordinator-export-").FullName;
        var log = new StringWriter();
        using var stopWorker = new CancellationTokenSource();
        Task<int>? worker = null;
        try
        {
            worker = new ClusterWorker(coordinator.Worker(WorkerId, Data.Address, store.Address, Path.Combine(scratch, "runs")), log).RunAsync(stopWorker.Token);

            // A tiny job whose steps 1 and 2 are committed; its end puts the final model into the store as step 2's hf export.
            var spec = new JobSpec
            {
                Name = Job, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 2, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
                Steps = 2, CheckpointInterval = 1, Seed = 7, Schedule = new() { WarmupSteps = 1 },
            };
            var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(spec), System.Text.Encoding.UTF8, "application/json"));
            Assert.Equal(HttpStatusCode.Created, submitted.StatusCode);
            await InProcessCoordinator.Until(async () => (await Status(http)).State == JobState.Completed, "the job completes", log);
            await InProcessCoordinator.Until(async () => (await Workers(http)).Any(w => w["savedModel"]?["step"]?.GetValue<long>() == 2), "the final model is in the store", log);
            Assert.Equal([1L, 2], (await Status(http)).Committed.Select(c => c.Step));

            // ---- The export, ordered over REST and run by the free worker ----
            var accepted = await Post(http, new { step = 1, format = "hf" });
            Assert.Equal(HttpStatusCode.Accepted, accepted.StatusCode);
            var running = (await accepted.Content.ReadFromJsonAsync<ExportRecord>(JobSpecJson.Options))!;
            Assert.Equal((1L, "hf", WorkerId), (running.Step, running.Format, running.WorkerId));
            var done = await Finished(http, 1, "hf", log);
            Assert.True(done.State == ExportStates.Done, $"the export ended {done.State}: {done.Error}");
            Assert.Equal($"exports/{Job}/00000001/hf/export.json", done.ManifestKey);

            var exports = new GrpcExportStore(new ExportStore.ExportStoreClient(store.Channel), store.Address);
            var downloaded = Path.Combine(scratch, "downloaded");
            var manifest = await exports.DownloadAsync(new ExportKey { Job = Job, Step = 1, Format = "hf" }, downloaded);
            Assert.Equal((done.Files, done.Bytes), (manifest.Files.Count, manifest.Files.Sum(f => f.Bytes)));
            // Against the checkpoint itself, loaded here from the store: every weight of the export is the checkpoint's.
            var checkpoints = new GrpcCheckpointStore(store.Client, store.Address, Job, Path.Combine(scratch, "staging"));
            var stepManifest = await checkpoints.ReadManifestAsync(1);
            using var fromCheckpoint = new DeepSeekForCausalLM(DeepSeekConfig.FromJson(stepManifest.Config!.Value.GetRawText(), "step 1"));
            string tokenizerHash = Data.Client.GetTokenizer(new Contracts.DataShards.GetManifestRequest { DatasetId = Data.DatasetId }).TokenizerHash;
            await ShardedCheckpointLoader.LoadReplicaAsync(checkpoints, 1, fromCheckpoint, null, tokenizerHash);
            var loaded = HfModelFolder.Load(downloaded);
            using var exported = loaded.Model;
            var expected = fromCheckpoint.state_dict();
            Assert.Equal(expected.Count, exported.state_dict().Count);
            Assert.All(exported.state_dict(), kv => Assert.True(kv.Value.equal(expected[kv.Key]).all().item<bool>(), $"{kv.Key} differs from the checkpoint's"));

            // ---- A failed export: step 2's hf export exists (the job's final model), and the store refuses another ----
            Assert.Equal(HttpStatusCode.Accepted, (await Post(http, new { step = 2, format = "hf" })).StatusCode);
            var failed = await Finished(http, 2, "hf", log);
            Assert.Equal(ExportStates.Failed, failed.State);
            Assert.Contains($"{Job}/2/hf", failed.Error);
            var events = (await Status(http)).Events;
            Assert.Contains(events, e => e.Kind == JobEventKinds.ExportStarted && e.Message.Contains("step 1 as hf") && e.Message.Contains(WorkerId));
            Assert.Contains(events, e => e.Kind == JobEventKinds.Exported && e.Message.Contains(done.ManifestKey!));
            Assert.Contains(events, e => e.Kind == JobEventKinds.ExportFailed && e.Reason == failed.Error);

            // ---- Bad requests, each refused with its reason ----
            using (var anonymous = new HttpClient { BaseAddress = http.BaseAddress })
                Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.PostAsJsonAsync($"/jobs/{Job}/exports", new { step = 1, format = "hf" })).StatusCode);
            await InProcessCoordinator.Refused(await Post(http, new { step = 1, format = "hf" }, "no-such-job"), HttpStatusCode.NotFound, "no job 'no-such-job'");
            await InProcessCoordinator.Refused(await Post(http, new { step = 7, format = "hf" }), HttpStatusCode.NotFound, "no checkpoint at step 7; committed steps: 1, 2");
            await InProcessCoordinator.Refused(await Post(http, new { step = 1, format = "safetensors" }), HttpStatusCode.BadRequest, "format 'safetensors' is not an export format: expected one of hf, hf-bf16");
            await InProcessCoordinator.Refused(await Post(http, new { format = "hf" }), HttpStatusCode.BadRequest, "step");
            await InProcessCoordinator.Refused(await Post(http, new { step = 1, format = "hf" }), HttpStatusCode.Conflict, $"already exported as hf: {done.ManifestKey}");
            Assert.Equal(HttpStatusCode.NotFound, (await http.GetAsync("/jobs/no-such-job/exports")).StatusCode);

            // With its only worker gone there is no one to run an export.
            Assert.Equal(HttpStatusCode.Accepted, (await http.PostAsync($"/workers/{WorkerId}/leave", null)).StatusCode);
            Assert.Equal(0, await worker.WaitAsync(TimeSpan.FromMinutes(1)));
            await InProcessCoordinator.Until(async () => (await Workers(http)).All(w => !w["online"]!.GetValue<bool>()), "the worker is offline", log);
            await InProcessCoordinator.Refused(await Post(http, new { step = 1, format = "gguf-q8_0" }), HttpStatusCode.Conflict, "no free worker");
            Assert.Equal(2, (await http.GetFromJsonAsync<ExportRecord[]>($"/jobs/{Job}/exports", JobSpecJson.Options))!.Length);
        }
        finally
        {
            await stopWorker.CancelAsync();
            if (worker is not null) await worker.WaitAsync(TimeSpan.FromMinutes(1));
            Directory.Delete(scratch, recursive: true);
        }
    }

    [Fact]
    public void TheCoordinatorAcceptsExactlyTheFormatsTheWorkerExports() => Assert.Equal(ModelExport.Formats, ExportFormats.All);

    static Task<HttpResponseMessage> Post(HttpClient http, object body, string job = Job) => http.PostAsJsonAsync($"/jobs/{job}/exports", body);

    static async Task<JobStatus> Status(HttpClient http) => (await http.GetFromJsonAsync<JobStatus>($"/jobs/{Job}", JobSpecJson.Options))!;

    static async Task<JsonNode[]> Workers(HttpClient http) => [.. (await http.GetFromJsonAsync<JsonArray>("/workers"))!.Select(w => w!)];

    static async Task<ExportRecord> Finished(HttpClient http, long step, string format, StringWriter log)
    {
        ExportRecord? record = null;
        await InProcessCoordinator.Until(async () =>
        {
            var all = await http.GetFromJsonAsync<ExportRecord[]>($"/jobs/{Job}/exports", JobSpecJson.Options);
            record = all!.LastOrDefault(r => r.Step == step && r.Format == format);
            return record is { State: not ExportStates.Running };
        }, $"the export of step {step} as {format} ends", log);
        return record!;
    }
}
