// The data-plane link key: made at each formation, the same for every member of a generation, handed out only in the
// Assignment on the authenticated control stream, never on REST (GET /workers shows assignments, GET /jobs is public).
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using Google.Protobuf;
using Grpc.Core;

namespace DeepSeekCluster.Coordinator.Tests;

public class LinkKeyTests
{
    static Metadata Bearer => new() { { "authorization", $"Bearer {CoordinatorHost.Token}" } };

    [Fact]
    public async Task EachGenerationGetsANewKeyThatEveryMemberSharesAndRestNeverShows()
    {
        await using var host = await CoordinatorHost.StartAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var a = host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await a.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "keyed-a", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41881" } });
        await TestSpecs.EventuallyAsync(() => host.Http.GetStringAsync("/workers"), w => w.Contains("\"keyed-a\""), "the first worker registered");
        string spec = JobSpecJson.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2) with { Name = "keyed" });
        await host.Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer);
        Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        var first = a.ResponseStream.Current.Assignment;
        Assert.Equal(1, first.Generation);
        Assert.Equal(32, first.LinkKey.Length);

        // A second worker: the job grows to generation 2, with a key of its own that both members receive.
        using var b = host.Control.Connect(Bearer, cancellationToken: cts.Token);
        await b.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "keyed-b", Device = "cpu", CollectiveEndpoint = "127.0.0.1:41882" } });
        do Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        while (a.ResponseStream.Current.Assignment is not { Generation: 2 });
        var secondA = a.ResponseStream.Current.Assignment;
        do Assert.True(await b.ResponseStream.MoveNext(cts.Token));
        while (b.ResponseStream.Current.Assignment is not { Generation: 2 });
        var secondB = b.ResponseStream.Current.Assignment;
        Assert.Equal(32, secondA.LinkKey.Length);
        Assert.Equal(secondA.LinkKey, secondB.LinkKey);
        Assert.NotEqual(first.LinkKey, secondA.LinkKey);

        // Neither key appears on REST, in any encoding a serializer would pick.
        string workers = await host.Http.GetStringAsync("/workers");
        string job = await host.Http.GetStringAsync("/jobs/keyed");
        string jobs = await host.Http.GetStringAsync("/jobs");
        Assert.Contains("\"keyed-b\"", workers); // the assignments are there, with their generation
        foreach (var body in new[] { workers, job, jobs })
        {
            Assert.DoesNotContain("linkKey", body, StringComparison.OrdinalIgnoreCase);
            foreach (var key in new[] { first.LinkKey, secondA.LinkKey })
            {
                Assert.DoesNotContain(key.ToBase64(), body);
                Assert.DoesNotContain(Convert.ToHexString(key.ToByteArray()), body, StringComparison.OrdinalIgnoreCase);
            }
        }
    }
}
