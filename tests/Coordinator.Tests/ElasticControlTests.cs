// Elastic control over real gRPC and REST: a zombie's stale report is refused with rejoin, and POST /workers/{id}/leave
// reaches the worker's stream as a Leave.
using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using Grpc.Core;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(CoordinatorCollection.Name)]
public class ElasticControlTests(CoordinatorFixture fixture)
{
    static Metadata Bearer => new() { { "authorization", $"Bearer {CoordinatorHost.Token}" } };

    [Fact]
    public async Task LeaveNeedsTheTokenNamesUnknownWorkersAndReachesTheWorkersStream()
    {
        var http = fixture.Host.Http;
        using (var anonymous = await http.PostAsync("/workers/leaver/leave", null))
            Assert.Equal(HttpStatusCode.Unauthorized, anonymous.StatusCode);
        using (var unknown = await http.SendAsync(Authorized("/workers/no-such-worker/leave")))
        {
            Assert.Equal(HttpStatusCode.NotFound, unknown.StatusCode);
            Assert.Contains("no-such-worker", await unknown.Content.ReadAsStringAsync());
        }

        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        using var stream = fixture.Host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "leaver", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41777" } });
        await TestSpecs.EventuallyAsync(() => http.GetStringAsync("/workers"), w => w.Contains("\"leaver\""), "the worker registered");
        using (var asked = await http.SendAsync(Authorized("/workers/leaver/leave")))
            Assert.Equal(HttpStatusCode.Accepted, asked.StatusCode);
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(CoordinatorMessage.KindOneofCase.Leave, stream.ResponseStream.Current.KindCase);
        Assert.Contains("leave", stream.ResponseStream.Current.Leave.Reason);
    }

    [Fact]
    public async Task AZombiesStaleReportIsRefusedWithRejoinAndRecorded()
    {
        await using var host = await CoordinatorHost.StartAsync(new Dictionary<string, string?> { ["Coordinator:HeartbeatTimeout"] = "00:00:02" });
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var stream = host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "sleeper", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41778" } });
        // Alive (beating as a free worker) until its assignment arrives, however slowly the job is submitted.
        using var beating = new CancellationTokenSource();
        var beats = Task.Run(async () =>
        {
            while (!beating.IsCancellationRequested)
            {
                await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 0 } });
                try { await Task.Delay(200, beating.Token); } catch (OperationCanceledException) { } // the beat's period, as a worker's heartbeat has one
            }
        });
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1) with { Name = "sleepy" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        await host.Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer);
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(1, stream.ResponseStream.Current.Assignment?.Generation);
        beating.Cancel();
        await beats;

        // Paused past the heartbeat timeout: the Coordinator gives up on it (its stream stays open) and says Stop.
        // (A free-worker heartbeat that crossed the assignment is refused without rejoin on the way.)
        do Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        while (stream.ResponseStream.Current.KindCase == CoordinatorMessage.KindOneofCase.Refused && !stream.ResponseStream.Current.Refused.Rejoin);
        Assert.Equal(CoordinatorMessage.KindOneofCase.Stop, stream.ResponseStream.Current.KindCase);

        // It wakes and reports as if nothing happened.
        await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 1, Step = 3 } });
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        var refused = stream.ResponseStream.Current.Refused;
        Assert.NotNull(refused);
        Assert.True(refused.Rejoin);
        Assert.Equal(1, refused.StaleGeneration);

        var job = await TestSpecs.EventuallyAsync(() => host.Control.GetJobAsync(new GetJobRequest { JobId = "sleepy" }).ResponseAsync,
            j => j.StatusJson.Contains("worker_fenced"), "worker_fenced in the job's events");
        using var status = JsonDocument.Parse(job.StatusJson);
        var kinds = status.RootElement.GetProperty("events").EnumerateArray().Select(e => e.GetProperty("kind").GetString()).ToList();
        Assert.Contains("worker_hung", kinds);
        Assert.Equal("Rescaling", job.State);
        string metrics = await TestSpecs.EventuallyAsync(() => host.Http.GetStringAsync("/metrics"),
            m => m.Contains("deepseek_cluster_job_events_total{") && m.Contains("event=\"worker_fenced\""), "job events on /metrics");
        Assert.Contains("event=\"worker_hung\"", metrics);
    }

    [Fact]
    public async Task TheFailureOfAGenerationAlreadyReformedIsRefusedAndTheWorkerStaysInTheCurrentOne()
    {
        // Found by the soak: a run cancelled by the grow's new Assignment reported its generation's failure; the
        // Coordinator refused it as stale but also ended the stream, so the worker left the generation just formed.
        await using var host = await CoordinatorHost.StartAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var a = host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await a.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "failer", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41779" } });
        await TestSpecs.EventuallyAsync(() => host.Http.GetStringAsync("/workers"), w => w.Contains("\"failer\""), "the first worker registered");
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2) with { Name = "grows" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        await host.Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer);
        Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(1, a.ResponseStream.Current.Assignment?.Generation);

        // A second worker: the job grows to generation 2 and the first worker is assigned it.
        using var b = host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await b.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "grower", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41780" } });
        do Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        while (a.ResponseStream.Current.Assignment is not { Generation: 2 });

        // Generation 1's run, cancelled by that Assignment, reports a failure on its way out.
        await a.RequestStream.WriteAsync(new WorkerMessage { Leaving = new Leaving { Reason = "rank 0: call cancelled", Failed = true, Generation = 1 } });
        Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(1, a.ResponseStream.Current.Refused?.StaleGeneration);
        Assert.False(a.ResponseStream.Current.Refused!.Rejoin); // it moved on to generation 2: not a zombie

        // The stream is still read: a stale heartbeat is answered (a closed stream would end here).
        await a.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 1 } });
        Assert.True(await a.ResponseStream.MoveNext(cts.Token), "the Coordinator closed the stream after a stale failure report");
        Assert.Equal(CoordinatorMessage.KindOneofCase.Refused, a.ResponseStream.Current.KindCase);

        var job = await host.Control.GetJobAsync(new GetJobRequest { JobId = "grows" });
        using var status = JsonDocument.Parse(job.StatusJson);
        Assert.Equal(("Running", 2L), (job.State, job.Generation));
        var workers = status.RootElement.GetProperty("workers").EnumerateArray().Select(w => w.GetProperty("workerId").GetString()).ToList();
        Assert.Contains("failer", workers);
        var kinds = status.RootElement.GetProperty("events").EnumerateArray().Select(e => e.GetProperty("kind").GetString()).ToList();
        Assert.DoesNotContain("worker_left", kinds);
        Assert.DoesNotContain("failed", kinds);
    }

    static HttpRequestMessage Authorized(string path)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, path);
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", CoordinatorHost.Token);
        return request;
    }
}
