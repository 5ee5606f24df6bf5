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

    [Fact]
    public async Task AWorkerThatSaysHelloReceivesItsAssignmentAndItsDeathIsNoticed()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var stream = Control.Connect(Bearer(CoordinatorHost.Token), cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "grpc-w1", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41001" } });

        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1) with { Name = "grpc-job" }, CoordinatorJson.Options);
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
}
