// POST /evaluations end to end: the real Coordinator orders free workers (the real ClusterWorker, three of them) to score
// their shares of the shipped tasks on a committed checkpoint from the real CheckpointStore; the shares are gathered over
// the evaluation's ring and combined on rank 0. One worker and three give the same results document. The job's own
// scores at its checkpoints (evalTasks) and every evaluation's are kept in the store with what was scored.
using System.Net;
using System.Net.Http.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;

namespace DeepSeekCluster.GpuWorker.Tests;

public class CoordinatorEvaluationTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    const string Job = "evaluated-job";
    static readonly string[] Tasks = ["kjv_nextverse", "kjv_cloze"];
    DataShardsHost Data => fixture.Host;

    [Fact]
    public async Task OneWorkerAndThreeScoreACommittedStepIdenticallyIntoTheJobsRecordAndBadRequestsAreNamed()
    {
        await using var store = await StoreHost.StartAsync();
        await using var coordinator = await InProcessCoordinator.StartAsync(store.Address);
        var http = coordinator.Http;
        var scratch = Directory.CreateTempSubdirectory("coordinator-evaluation-").FullName;
        var log = new StringWriter();
        using var stopWorkers = new CancellationTokenSource();
        var workers = new List<Task<int>>();
        try
        {
            for (int i = 0; i < 3; i++)
                workers.Add(new ClusterWorker(coordinator.Worker($"scorer-{i}", Data.Address, store.Address, Path.Combine(scratch, $"runs-{i}")), log).RunAsync(stopWorkers.Token));
            await InProcessCoordinator.Until(async () => (await http.GetFromJsonAsync<JsonArray>("/workers"))!.Count == 3, "three workers are online", log);
            var spec = new JobSpec
            {
                Name = Job, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 2, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
                Steps = 2, Seed = 11, Schedule = new() { WarmupSteps = 1 }, CheckpointInterval = 1, EvalTasks = Tasks, EvalLimit = 6,
            };
            var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(spec), System.Text.Encoding.UTF8, "application/json"));
            Assert.Equal(HttpStatusCode.Created, submitted.StatusCode);
            await InProcessCoordinator.Until(async () => (await Status(http)).State == JobState.Completed, "the job completes", log);

            // The job's own scores at each committed step (evalTasks) are kept with the checkpoint in the store, as the
            // results document rank 0 reported: the scores in it are those the job's status shows for that step.
            var trained = await Status(http);
            Assert.Equal([1L, 2], trained.Committed.Select(c => c.Step));
            foreach (long step in new long[] { 1, 2 })
            {
                var keptAtStep = (await store.Client.ListEvaluationsAsync(new Contracts.Checkpoints.ListEvaluationsRequest { Job = Job, Step = step })).Evaluations;
                var training = Assert.Single(keptAtStep, e => e.EvaluationId == "training");
                var reported = trained.Evaluations.Where(e => e.Step == step).OrderBy(e => (e.Task, e.Metric)).ToList();
                Assert.Equal(Tasks.Order(), reported.Select(e => e.Task).Distinct().Order());
                Assert.Equal(reported, Coordinator.Grains.EvaluationResults.Parse(step, training.ResultsJson).OrderBy(e => (e.Task, e.Metric)));
                Assert.Equal(6, JsonNode.Parse(training.ResultsJson)!["n-samples"]!["kjv_cloze"]!["effective"]!.GetValue<int>());
                // The REST API lists what the store keeps with the step.
                var listed = (await http.GetFromJsonAsync<JsonObject>($"/jobs/{Job}/evaluations?step={step}"))!;
                Assert.Equal(JsonNode.Parse(training.ResultsJson)!.ToJsonString(), Assert.Single(listed["evaluations"]!.AsArray(), e => e!["id"]!.GetValue<string>() == "training")!["results"]!.ToJsonString());
            }

            var one = await Evaluate(http, workers: 1, log);
            var three = await Evaluate(http, workers: 3, log);
            Assert.True(one.State == EvaluationStates.Done, $"one worker: {one.State}: {one.Error}");
            Assert.True(three.State == EvaluationStates.Done, $"three workers: {three.State}: {three.Error}");
            Assert.Equal(3, three.Workers.Distinct().Count());
            // The whole document but the three fields that say when and how long (date, time, this rank's tokens): bit for bit.
            Assert.Equal(Comparable(one.ResultsJson!), Comparable(three.ResultsJson!));
            Assert.Equal(one.Scores, three.Scores);
            var results = JsonNode.Parse(one.ResultsJson!)!["results"]!.AsObject();
            Assert.Equal(Tasks.Order(), results.Select(kv => kv.Key).Order());
            Assert.All(Tasks, t => Assert.InRange(results[t]!["acc,none"]!.GetValue<double>(), 0, 1));
            Assert.Equal(12, JsonNode.Parse(one.ResultsJson!)!["n-samples"]!["kjv_cloze"]!["effective"]!.GetValue<int>());

            // The job's end put its final model into the store as step 2's hf export: scoring that gives the same document.
            await InProcessCoordinator.Until(async () => (await http.GetFromJsonAsync<JsonArray>("/workers"))!.Any(w => w!["savedModel"]?["step"]?.GetValue<long>() == 2),
                "the final model is in the store", log);
            var saved = (await http.GetFromJsonAsync<JsonArray>("/workers"))!.Select(w => w!["savedModel"]).Single(m => m is not null)!;
            Assert.Equal($"exports/{Job}/2/hf", saved["path"]!.GetValue<string>());
            // gpu-worker generate reads it from the store: the same greedy tokens as the export downloaded and loaded here.
            var downloaded = Path.Combine(scratch, "final-model");
            await new GrpcExportStore(new Contracts.Checkpoints.ExportStore.ExportStoreClient(store.Channel), store.Address)
                .DownloadAsync(new Contracts.Checkpoints.ExportKey { Job = Job, Step = 2, Format = "hf" }, downloaded);
            int[] expected;
            var folder = Training.IO.HfModelFolder.Load(downloaded);
            using (var loaded = folder.Model)
                expected = Training.Engine.TextGenerator.Generate(loaded, [5, 6, 7], new Training.Engine.SamplingOptions
                {
                    MaxNewTokens = 6, Temperature = 0, EosTokenId = folder.Tokenizer?.EosTokenId ?? loaded.Config.EosTokenId,
                });
            var (code, stdout, stderr) = GpuWorkerCli("generate", "--store", store.Address, "--job", Job, "--step", "2", "--prompt-ids", "5,6,7",
                                              "--max-new-tokens", "6", "--greedy", "--json", "--device", "cpu");
            Assert.True(code == 0, stdout + stderr);
            var generated = JsonNode.Parse(stdout.Trim().Split('\n')[^1])!["generated_ids"]!.AsArray().Select(i => i!.GetValue<int>()).ToArray();
            Assert.Equal(expected, generated);
            Assert.NotEmpty(generated);

            var exported = await Evaluate(http, workers: 2, log, export: "hf");
            Assert.True(exported.State == EvaluationStates.Done, $"the hf export: {exported.State}: {exported.Error}");
            Assert.Equal(Comparable(one.ResultsJson!), Comparable(exported.ResultsJson!));

            // Kept with the checkpoint in the store, word for word: the two evaluations of step 2's checkpoint beside the
            // job's own; the export's with the export (it outlives the step's folder).
            var kept = (await store.Client.ListEvaluationsAsync(new Contracts.Checkpoints.ListEvaluationsRequest { Job = Job, Step = 2 })).Evaluations;
            Assert.Equal(new[] { one.Id, three.Id, "training" }.Order(StringComparer.Ordinal), kept.Select(e => e.EvaluationId));
            Assert.Equal(one.ResultsJson, kept.Single(e => e.EvaluationId == one.Id).ResultsJson);
            Assert.Equal(three.ResultsJson, kept.Single(e => e.EvaluationId == three.Id).ResultsJson);
            var keptWithExport = (await store.Client.ListEvaluationsAsync(new Contracts.Checkpoints.ListEvaluationsRequest { Job = Job, Step = 2, ExportFormat = "hf" })).Evaluations;
            Assert.Equal(exported.ResultsJson, Assert.Single(keptWithExport, e => e.EvaluationId == exported.Id).ResultsJson);
            var listedWithExport = (await http.GetFromJsonAsync<JsonObject>($"/jobs/{Job}/evaluations?step=2&export=hf"))!;
            Assert.Equal([exported.Id], listedWithExport["evaluations"]!.AsArray().Select(e => e!["id"]!.GetValue<string>()));
            Assert.Equal(JsonNode.Parse(exported.ResultsJson!)!.ToJsonString(), listedWithExport["evaluations"]![0]!["results"]!.ToJsonString());
            await InProcessCoordinator.Refused(await http.GetAsync($"/jobs/{Job}/evaluations?step=3"), HttpStatusCode.NotFound, "step 3 of job 'evaluated-job' is not committed");
            await InProcessCoordinator.Refused(await http.GetAsync($"/jobs/{Job}/evaluations?step=2&export=hf-bf16"), HttpStatusCode.NotFound, "is not committed");
            await InProcessCoordinator.Refused(await http.GetAsync($"/jobs/{Job}/evaluations"), HttpStatusCode.BadRequest, "required: ?step=N");
            Assert.Equal(HttpStatusCode.NotFound, (await http.GetAsync("/jobs/no-such-job/evaluations?step=2")).StatusCode);

            // Into the job's record: its scores at step 2 (the status page and GET /jobs/{id} read them), its events.
            var status = await Status(http);
            Assert.Equal(one.Scores.OrderBy(s => (s.Task, s.Metric)), status.Evaluations.Where(e => e.Step == 2).OrderBy(s => (s.Task, s.Metric)));
            Assert.Equal(3, status.Events.Count(e => e.Kind == JobEventKinds.Evaluated && e.ResumeStep == 2));
            Assert.Contains(status.Events, e => e.Kind == JobEventKinds.EvaluationStarted && e.Message.Contains(three.Id) && e.Message.Contains("3 worker(s)"));

            // ---- Bad requests ----
            await InProcessCoordinator.Refused(await Post(http, new { job = Job, step = 2, tasks = Array.Empty<string>(), workers = 1 }), HttpStatusCode.BadRequest, "must be 1 to 8 distinct task names");
            await InProcessCoordinator.Refused(await Post(http, new { job = Job, step = 2, tasks = Tasks, workers = 0 }), HttpStatusCode.BadRequest, "0 must be 1 to 64 free workers");
            await InProcessCoordinator.Refused(await Post(http, new { job = "no-such-job", step = 2, tasks = Tasks, workers = 1 }), HttpStatusCode.NotFound, "no job 'no-such-job'");
            await InProcessCoordinator.Refused(await Post(http, new { job = Job, step = 3, tasks = Tasks, workers = 1 }), HttpStatusCode.NotFound, "no checkpoint at step 3; committed steps: 1, 2");
            await InProcessCoordinator.Refused(await Post(http, new { job = Job, step = 2, tasks = Tasks, workers = 4 }), HttpStatusCode.Conflict, "no free workers: 4 asked, 3 free");
            using (var anonymous = new HttpClient { BaseAddress = http.BaseAddress })
                Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.PostAsJsonAsync("/evaluations", new { job = Job, step = 2, tasks = Tasks })).StatusCode);
            // A task no worker has: every rank fails naming it, and the workers are free again for the next request.
            var missing = await Evaluate(http, workers: 2, log, ["no_such_task"]);
            Assert.Equal(EvaluationStates.Failed, missing.State);
            Assert.Contains("no_such_task", missing.Error);
            Assert.Contains((await Status(http)).Events, e => e.Kind == JobEventKinds.EvaluationFailed && e.Message.Contains(missing.Id));
            Assert.Equal(EvaluationStates.Done, (await Evaluate(http, workers: 3, log)).State);
            await InProcessCoordinator.Refused(await Post(http, new { job = Job, step = 2, tasks = Tasks, workers = 1, export = "gguf-f16" }), HttpStatusCode.BadRequest, "'gguf-f16' must be an export format the workers load back: hf or hf-bf16");
            var noExport = await Evaluate(http, workers: 1, log, export: "hf-bf16");
            Assert.Equal(EvaluationStates.Failed, noExport.State);
            Assert.Contains($"no committed export {Job}/2/hf-bf16", noExport.Error);
            Assert.Equal(HttpStatusCode.NotFound, (await http.GetAsync("/evaluations/eval-none")).StatusCode);
        }
        finally
        {
            await stopWorkers.CancelAsync();
            await Task.WhenAll(workers).WaitAsync(TimeSpan.FromMinutes(1));
            Directory.Delete(scratch, recursive: true);
        }
    }

    /// <summary>The gpu-worker executable (beside this test's assembly) with <paramref name="args"/>; its exit code and output.</summary>
    static (int Code, string Stdout, string Stderr) GpuWorkerCli(params string[] args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "gpu-worker.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = System.Diagnostics.Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout, stderr.Result);
    }

    static Task<HttpResponseMessage> Post(HttpClient http, object body) => http.PostAsJsonAsync("/evaluations", body);

    static async Task<JobStatus> Status(HttpClient http) => (await http.GetFromJsonAsync<JobStatus>($"/jobs/{Job}", JobSpecJson.Options))!;

    /// <summary>Orders an evaluation of step 2 (12 examples a task) and waits for its end on every rank.</summary>
    static async Task<EvaluationRecord> Evaluate(HttpClient http, int workers, StringWriter log, string[]? tasks = null, string? export = null)
    {
        var response = await Post(http, new { job = Job, step = 2, tasks = tasks ?? Tasks, limit = 12, workers, export });
        Assert.True(response.StatusCode == HttpStatusCode.Accepted, await response.Content.ReadAsStringAsync());
        var started = (await response.Content.ReadFromJsonAsync<EvaluationRecord>(JobSpecJson.Options))!;
        Assert.Equal(workers, started.Workers.Length);
        EvaluationRecord? record = null;
        await InProcessCoordinator.Until(async () =>
        {
            record = await http.GetFromJsonAsync<EvaluationRecord>($"/evaluations/{started.Id}", JobSpecJson.Options);
            // Failed is said at the first rank's error; the others are let go as they report (Finished lists them).
            return record is { State: not EvaluationStates.Running } && record.Finished.Length == workers;
        }, $"evaluation {started.Id} ends and every rank has reported", log);
        return record!;
    }

    static string Comparable(string resultsJson)
    {
        var doc = JsonNode.Parse(resultsJson)!.AsObject();
        foreach (var when in new[] { "date", "total_evaluation_time_seconds", "tokens_scored" }) Assert.True(doc.Remove(when), $"the results have no '{when}'");
        return doc.ToJsonString();
    }
}
