// An evaluation or export whose worker dies: real processes, killed with SIGKILL. The Coordinator (its own process, on a
// state folder that outlives it) orders the work on a gpu-worker process whose CheckpointStore address is a listener that
// accepts and never answers, so the work is held mid-way for as long as the test needs, whatever the machine's speed.
// A worker killed mid-evaluation fails the evaluation (its control stream ended); a Coordinator and a worker both killed
// mid-export leave a record that the restarted Coordinator fails once the worker has not come back, freeing its hold.
using System.Diagnostics;
using System.Net;
using System.Net.Http.Json;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;

namespace DeepSeekCluster.GpuWorker.Tests;

public class OrderedWorkLostTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    const string Job = "lost-work-job", Lost = "lost-worker";
    const string Token = InProcessCoordinator.Token;
    DataShardsHost Data => fixture.Host;
    static string Bin => AppContext.BaseDirectory;

    [Fact]
    public async Task AWorkerKilledMidEvaluationFailsItAndAnExportWhoseCoordinatorAndWorkerDiedEndsFailedAfterTheRestart()
    {
        await using var store = await StoreHost.StartAsync();
        using var silent = new SilentListener();
        var scratch = Directory.CreateTempSubdirectory("ordered-work-lost-").FullName;
        var log = new StringWriter();
        int httpPort = FreePort.Next(), grpcPort = FreePort.Next();
        Process? coordinator = null, worker = null;
        try
        {
            coordinator = StartCoordinator(scratch, httpPort, grpcPort, store.Address);
            using var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{httpPort}") };
            http.DefaultRequestHeaders.Authorization = new("Bearer", Token);
            await InProcessCoordinator.Until(() => Healthy(http), "the Coordinator process is healthy", log);

            // A committed step to work on, trained by an in-process worker that then leaves.
            using (var stopTrainer = new CancellationTokenSource())
            {
                var trainerSettings = new WorkerSettings
                {
                    Coordinator = new Uri($"http://127.0.0.1:{grpcPort}"), DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = Token,
                    WorkerId = "trainer", Device = "cpu", OutputDir = Path.Combine(scratch, "trainer"), CollectivePort = FreePort.Next(), PipelinePort = FreePort.Next(),
                };
                var trainer = new ClusterWorker(trainerSettings, log).RunAsync(stopTrainer.Token);
                var spec = new JobSpec
                {
                    Name = Job, ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = 2, MicroBatch = 2, SeqLen = DataShardsHost.SeqLen,
                    Steps = 1, Seed = 5, Schedule = new() { WarmupSteps = 1 },
                };
                var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(spec), System.Text.Encoding.UTF8, "application/json"));
                Assert.Equal(HttpStatusCode.Created, submitted.StatusCode);
                await InProcessCoordinator.Until(async () => (await http.GetFromJsonAsync<JobStatus>($"/jobs/{Job}", JobSpecJson.Options))!.State == JobState.Completed, "the job completes", log);
                await stopTrainer.CancelAsync();
                await trainer.WaitAsync(TimeSpan.FromMinutes(1));
                await InProcessCoordinator.Until(async () => !await Online(http, "trainer"), "the trainer is offline", log);
            }

            // ---- Killed mid-evaluation: the only free worker is the one that can never load the step ----
            worker = StartWorker(scratch, grpcPort, silent.Address);
            await InProcessCoordinator.Until(() => Online(http, Lost), "the gpu-worker process is online", log);
            var ordered = await http.PostAsJsonAsync("/evaluations", new { job = Job, step = 1, tasks = new[] { "kjv_cloze" }, limit = 4, workers = 1 });
            Assert.True(ordered.StatusCode == HttpStatusCode.Accepted, await ordered.Content.ReadAsStringAsync());
            var evaluation = (await ordered.Content.ReadFromJsonAsync<EvaluationRecord>(JobSpecJson.Options))!;
            Assert.Equal([Lost], evaluation.Workers);
            // Held: the step is read from the silent store, so the share cannot have ended when the process dies.
            await InProcessCoordinator.Until(() => Task.FromResult(silent.Accepted > 0), "the worker asks the store for the step", log);
            Kill(worker);
            EvaluationRecord? failed = null;
            await InProcessCoordinator.Until(async () =>
            {
                failed = await http.GetFromJsonAsync<EvaluationRecord>($"/evaluations/{evaluation.Id}", JobSpecJson.Options);
                return failed!.State != EvaluationStates.Running;
            }, "the evaluation ends", log);
            Assert.Equal(EvaluationStates.Failed, failed!.State);
            Assert.Contains("its control stream ended before its share was scored", failed.Error);

            // ---- Coordinator and worker both killed mid-export ----
            int acceptedBefore = silent.Accepted;
            worker = StartWorker(scratch, grpcPort, silent.Address);
            await InProcessCoordinator.Until(() => Online(http, Lost), "the gpu-worker process is back online", log);
            var export = await http.PostAsJsonAsync($"/jobs/{Job}/exports", new { step = 1, format = "hf" });
            Assert.True(export.StatusCode == HttpStatusCode.Accepted, await export.Content.ReadAsStringAsync());
            await InProcessCoordinator.Until(() => Task.FromResult(silent.Accepted > acceptedBefore), "the worker asks the store for the step to export", log);
            Assert.Equal(ExportStates.Running, Assert.Single(await Exports(http)).State);
            Kill(coordinator);
            Kill(worker);

            coordinator = StartCoordinator(scratch, httpPort, grpcPort, store.Address);
            await InProcessCoordinator.Until(() => Healthy(http), "the restarted Coordinator is healthy", log);
            ExportRecord? ended = null;
            await InProcessCoordinator.Until(async () => (ended = Assert.Single(await Exports(http))).State != ExportStates.Running,
                "the restarted Coordinator ends the export whose worker never came back", log);
            Assert.Equal(ExportStates.Failed, ended!.State);
            Assert.Equal(Lost, ended.WorkerId);
            Assert.Contains("the worker's control stream ended before the export finished (no heartbeat for 2 s)", ended.Error);
            var events = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{Job}", JobSpecJson.Options))!.Events;
            Assert.Contains(events, e => e.Kind == JobEventKinds.ExportFailed && e.Message.Contains(Lost));
            // Asked again, the export is not "already being exported": refused only because no worker is online.
            var again = await http.PostAsJsonAsync($"/jobs/{Job}/exports", new { step = 1, format = "hf" });
            await InProcessCoordinator.Refused(again, HttpStatusCode.Conflict, "no free worker");
        }
        finally
        {
            foreach (var p in new[] { worker, coordinator }) if (p is not null) { Kill(p); p.Dispose(); }
            Directory.Delete(scratch, recursive: true);
        }
    }

    static async Task<ExportRecord[]> Exports(HttpClient http) => (await http.GetFromJsonAsync<ExportRecord[]>($"/jobs/{Job}/exports", JobSpecJson.Options))!;

    static async Task<bool> Healthy(HttpClient http)
    {
        try { return (await http.GetAsync("/health")).IsSuccessStatusCode; }
        catch (HttpRequestException) { return false; }
    }

    static async Task<bool> Online(HttpClient http, string workerId) =>
        (await http.GetFromJsonAsync<JsonArray>("/workers"))!.Any(w => w!["workerId"]!.GetValue<string>() == workerId && w["online"]!.GetValue<bool>());

    static void Kill(Process p)
    {
        if (p.HasExited) return;
        p.Kill(); // SIGKILL on Linux: no shutdown code runs
        p.WaitForExit();
    }

    /// <summary>The Coordinator as its own process (its Program), state in a folder that outlives the process.</summary>
    static Process StartCoordinator(string scratch, int httpPort, int grpcPort, string storeAddress) =>
        Start("DeepSeekCluster.Coordinator.dll", [], new()
        {
            ["Kestrel__Endpoints__http__Url"] = $"http://127.0.0.1:{httpPort}", ["Kestrel__Endpoints__http__Protocols"] = "Http1",
            ["Kestrel__Endpoints__grpc__Url"] = $"http://127.0.0.1:{grpcPort}", ["Kestrel__Endpoints__grpc__Protocols"] = "Http2",
            ["Cluster__Token"] = Token, ["Coordinator__StateFolder"] = Path.Combine(scratch, "coordinator-state"),
            ["Coordinator__HeartbeatTimeout"] = "00:00:02", ["Coordinator__ReconnectGrace"] = "00:00:02",
            ["Orleans__SiloPort"] = FreePort.Next().ToString(), ["Orleans__GatewayPort"] = FreePort.Next().ToString(),
            [WorkerSettings.CheckpointsKey.Replace(":", "__")] = storeAddress,
        });

    /// <summary>A gpu-worker process ("join") whose CheckpointStore never answers.</summary>
    Process StartWorker(string scratch, int grpcPort, string silentStore) =>
        Start("gpu-worker.dll", ["join"], new()
        {
            [WorkerSettings.CoordinatorKey.Replace(":", "__")] = $"http://127.0.0.1:{grpcPort}",
            [WorkerSettings.DataShardsKey.Replace(":", "__")] = Data.Address.ToString(),
            [WorkerSettings.CheckpointsKey.Replace(":", "__")] = silentStore,
            ["Cluster__Token"] = Token, ["Worker__Id"] = Lost, ["Worker__Device"] = "cpu", ["Worker__OutputDir"] = Path.Combine(scratch, "lost"),
            ["Worker__CollectivePort"] = FreePort.Next().ToString(), ["Worker__PipelinePort"] = FreePort.Next().ToString(),
            ["Kestrel__Endpoints__http__Url"] = "http://127.0.0.1:0",
        });

    static Process Start(string dll, string[] args, Dictionary<string, string> environment)
    {
        var psi = new ProcessStartInfo("dotnet") { WorkingDirectory = Bin, RedirectStandardOutput = false, RedirectStandardError = false, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(Bin, dll));
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["DOTNET_ENVIRONMENT"] = "Testing";
        psi.Environment["ASPNETCORE_ENVIRONMENT"] = "Testing";
        foreach (var (k, v) in environment) psi.Environment[k] = v;
        return Process.Start(psi)!;
    }

    /// <summary>A TCP listener that accepts every connection and never sends a byte: a store whose calls never end.</summary>
    sealed class SilentListener : IDisposable
    {
        readonly TcpListener listener = new(IPAddress.Loopback, 0);
        readonly List<Socket> held = [];
        int accepted;

        public SilentListener()
        {
            listener.Start();
            Address = $"http://127.0.0.1:{((IPEndPoint)listener.LocalEndpoint).Port}";
            _ = AcceptAsync();
        }

        public string Address { get; }
        public int Accepted => Volatile.Read(ref accepted);

        async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    var socket = await listener.AcceptSocketAsync();
                    lock (held) held.Add(socket);
                    Interlocked.Increment(ref accepted);
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        }

        public void Dispose()
        {
            listener.Stop();
            lock (held) foreach (var s in held) s.Dispose();
        }
    }
}
