// A fake worker on a real GrpcChannel: hello, assignment after a job is submitted, refusal of a wrong token, and a
// killed stream noticed at once.
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using Grpc.Core;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(CoordinatorCollection.Name)]
public class ClusterControlTests(CoordinatorFixture fixture)
{
    ClusterControl.ClusterControlClient Control => fixture.Host.Control;

    static Metadata Bearer(string token) => new() { { "authorization", $"Bearer {token}" } };

    /// <summary>Ends a test's job, so that it does not claim the workers of the tests after it (they share the Coordinator).</summary>
    async Task StopJobAsync(string jobId)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, $"/jobs/{jobId}/stop");
        request.Headers.Authorization = new("Bearer", CoordinatorHost.Token);
        using var response = await fixture.Host.Http.SendAsync(request);
        response.EnsureSuccessStatusCode();
    }

    /// <summary>What the AppHost learns from the Coordinator instead of log lines: each worker's /metrics and the saved model.</summary>
    [Fact]
    public async Task GetWorkersShowsTheMetricsEndpointFromHelloAndTheModelAWorkerSaved()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var stream = Control.Connect(Bearer(CoordinatorHost.Token), cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello
        {
            WorkerId = "grpc-saver", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41009", MetricsEndpoint = "http://127.0.0.1:40999",
        } });
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1) with { Name = "saver-job" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        await Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer(CoordinatorHost.Token));
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        Assert.Equal("saver-job", stream.ResponseStream.Current.Assignment.JobId);

        await stream.RequestStream.WriteAsync(new WorkerMessage { ModelSaved = new ModelSaved { Generation = 1, Step = 5, Path = "/runs/workers/saver-job/model" } });
        var worker = await TestSpecs.EventuallyAsync(async () =>
            {
                using var doc = JsonDocument.Parse(await fixture.Host.Http.GetStringAsync("/workers", cts.Token));
                return doc.RootElement.EnumerateArray().Where(w => w.GetProperty("workerId").GetString() == "grpc-saver").Select(w => w.Clone()).FirstOrDefault();
            }, w => w.ValueKind == JsonValueKind.Object && w.TryGetProperty("savedModel", out _), "GET /workers showing the saved model", seconds: 20);
        Assert.Equal("http://127.0.0.1:40999", worker.GetProperty("capabilities").GetProperty("metricsEndpoint").GetString());
        var model = worker.GetProperty("savedModel");
        Assert.Equal(("saver-job", 5L, "/runs/workers/saver-job/model"),
                     (model.GetProperty("jobId").GetString(), model.GetProperty("step").GetInt64(), model.GetProperty("path").GetString()));
        await StopJobAsync("saver-job");
        stream.Dispose();
    }

    [Fact]
    public async Task AWorkerThatSaysHelloReceivesItsAssignmentAndItsDeathIsNoticed()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var stream = Control.Connect(Bearer(CoordinatorHost.Token), cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "grpc-w1", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41001" } });

        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1) with { Name = "grpc-job" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        var submitted = await Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer(CoordinatorHost.Token));
        Assert.Equal("grpc-job", submitted.JobId);

        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        var assignment = stream.ResponseStream.Current.Assignment;
        Assert.NotNull(assignment);
        Assert.Equal(("grpc-job", 1L, 0, 1), (assignment.JobId, assignment.Generation, assignment.Rank, assignment.World));
        Assert.Equal("127.0.0.1:41001", assignment.Peers[0]);

        await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 1, Step = 1, Loss = 7 } });
        await stream.RequestStream.WriteAsync(new WorkerMessage { Step = new StepReport { Generation = 1, Rank = 0, Step = 1, Loss = 7 } });
        await stream.RequestStream.WriteAsync(new WorkerMessage { Step = new StepReport { Generation = 0, Rank = 0, Step = 2, Loss = 6 } });
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        Assert.Contains("generation 0 is not the current generation 1", stream.ResponseStream.Current.Refused.Reason);

        stream.Dispose(); // the process dies: the call is cancelled without a Leaving message
        var job = await TestSpecs.EventuallyAsync(() => Control.GetJobAsync(new GetJobRequest { JobId = "grpc-job" }).ResponseAsync,
            j => j.State == "Rescaling", "the job noticing its worker died", seconds: 30);
        Assert.Equal(1, job.Step);
        await StopJobAsync("grpc-job");
    }

    [Fact]
    public async Task AWorkerWithAWrongTokenIsRefused()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        var stream = Control.Connect(cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "intruder", Token = "guess" } });
        Assert.True(await stream.ResponseStream.MoveNext(cts.Token));
        Assert.Equal(CoordinatorMessage.KindOneofCase.Refused, stream.ResponseStream.Current.KindCase);
        Assert.False(await stream.ResponseStream.MoveNext(cts.Token));

        var e = await Assert.ThrowsAsync<RpcException>(() => Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = "{}" }, Bearer("guess")).ResponseAsync);
        Assert.Equal(StatusCode.Unauthenticated, e.StatusCode);
        var workers = await fixture.Host.Http.GetStringAsync("/workers");
        Assert.DoesNotContain("intruder", workers);
    }

    [Fact]
    public async Task SubmitJobRefusesAFieldTheSpecDoesNotHaveNamingItsPath()
    {
        var spec = System.Text.Json.Nodes.JsonNode.Parse(JsonSerializer.Serialize(TestSpecs.Tiny() with { Name = "grpc-unknown-field" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options))!;
        spec["parallel"]!["zero_stage"] = 2;
        var e = await Assert.ThrowsAsync<RpcException>(() => Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec.ToJsonString() }, Bearer(CoordinatorHost.Token)).ResponseAsync);
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("'zero_stage'", e.Status.Detail);
        Assert.Contains("Path: $.parallel.zero_stage", e.Status.Detail);
    }

    [Fact]
    public async Task TheFirstRanksNcclUniqueIdReachesTheOtherRanksOfItsGenerationAndNoOneElseMayMakeIt()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var streams = new[] { "nccl-w1", "nccl-w2" }.Select(worker => (Id: worker, Stream: Control.Connect(Bearer(CoordinatorHost.Token), cancellationToken: cts.Token))).ToArray();
        int port = 41100;
        foreach (var (worker, s) in streams)
            await s.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = worker, Device = "cuda:0", Host = "127.0.0.1", CollectiveEndpoint = $"127.0.0.1:{port++}" } });
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2) with { Name = "nccl-job" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        await Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer(CoordinatorHost.Token));

        var ranks = new Dictionary<int, AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage>>();
        foreach (var (_, s) in streams)
        {
            Assert.True(await s.ResponseStream.MoveNext(cts.Token));
            var a = s.ResponseStream.Current.Assignment;
            Assert.Equal(("nccl-job", 1L, 2), (a.JobId, a.Generation, a.World));
            ranks[a.Rank] = s;
            await s.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 1 } });
        }

        // Every byte value once or more, so nothing on the way may re-encode them.
        var id = Google.Protobuf.ByteString.CopyFrom(Enumerable.Range(0, 128).Select(i => (byte)(255 - i * 2)).ToArray());
        await ranks[0].RequestStream.WriteAsync(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = 1, Group = 0, Id = id } });
        Assert.True(await ranks[1].ResponseStream.MoveNext(cts.Token));
        var shared = ranks[1].ResponseStream.Current.NcclUniqueId;
        Assert.NotNull(shared);
        Assert.Equal((1L, 0), (shared.Generation, shared.Group));
        Assert.Equal(id, shared.Id);

        // Rank 1 is not its group's first rank, and generation 0 is over: both are refused, and rank 0 hears of neither.
        await ranks[1].RequestStream.WriteAsync(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = 1, Group = 0, Id = id } });
        Assert.True(await ranks[1].ResponseStream.MoveNext(cts.Token));
        Assert.Equal("rank 1 sent the NCCL unique id of group 0; in generation 1 (dp 2 × pp 1) that is rank 0's to make", ranks[1].ResponseStream.Current.Refused.Reason);
        await ranks[0].RequestStream.WriteAsync(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = 0, Group = 0, Id = id } });
        Assert.True(await ranks[0].ResponseStream.MoveNext(cts.Token));
        Assert.Contains("generation 0 is not the current generation 1", ranks[0].ResponseStream.Current.Refused.Reason);

        // A first rank that cannot make one says why, and the others hear it.
        await ranks[0].RequestStream.WriteAsync(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = 1, Group = 0, Reason = "libnccl.so.2 could not be loaded" } });
        Assert.True(await ranks[1].ResponseStream.MoveNext(cts.Token));
        Assert.Equal((true, "libnccl.so.2 could not be loaded"), (ranks[1].ResponseStream.Current.NcclUniqueId.Id.IsEmpty, ranks[1].ResponseStream.Current.NcclUniqueId.Reason));

        await StopJobAsync("nccl-job");
        foreach (var (_, s) in streams) s.Dispose();
    }
}
