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
                try { await Task.Delay(200, beating.Token); } catch (OperationCanceledException) { }
            }
        });
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1) with { Name = "sleepy" }, CoordinatorJson.Options);
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

    static HttpRequestMessage Authorized(string path)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, path);
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", CoordinatorHost.Token);
        return request;
    }
}
