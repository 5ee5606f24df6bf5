// A worker as its pod runs it (the built gpu-worker, `join`, configured by environment) against a real Coordinator
// process: not Ready before the Coordinator has registered it, Ready once it has; after POST /workers/{id}/leave it
// stays up (alive, unready, out of the cluster) instead of exiting into a restart and a rejoin; SIGTERM then ends it
// with 0. The liveness endpoint answers throughout.
using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;

namespace DeepSeekCluster.Deployment.Tests;

public class WorkerLifecycleTests
{
    const string Token = "worker-lifecycle-token";

    [Fact]
    public async Task AWorkerIsReadyOnlyWhileRegisteredAndALeaveStaysALeave()
    {
        int coordinatorHttp = FreePort.Next(), coordinatorGrpc = FreePort.Next();
        string root = Directory.CreateTempSubdirectory("worker-lifecycle-").FullName;
        // The worker first, with no Coordinator yet to register with.
        await using var worker = ServiceProcess.Launch(ServiceProcess.WorkerAssembly, ["join"], new Dictionary<string, string>
        {
            ["services__coordinator__grpc__0"] = $"http://127.0.0.1:{coordinatorGrpc}",
            ["services__data-shards__grpc__0"] = "http://127.0.0.1:1", // never dialled: the worker gets no assignment here
            ["services__checkpoints__grpc__0"] = "http://127.0.0.1:1",
            ["Cluster__Token"] = Token,
            ["Worker__Id"] = "lifecycle-0",
            ["Worker__Device"] = "cpu",
            ["Worker__OutputDir"] = Path.Combine(root, "worker"),
            ["Worker__StayAfterLeave"] = "true",
        }, FreePort.Next(), FreePort.Next());
        await worker.WaitForHealthAsync(ready: false, TimeSpan.FromSeconds(60));
        Assert.Equal(HttpStatusCode.OK, (await worker.Http.GetAsync("/alive")).StatusCode);

        await using var coordinator = await ServiceProcess.StartAsync("DeepSeekCluster.Coordinator", new Dictionary<string, string>
        {
            ["Cluster__Token"] = Token,
            ["Coordinator__StateFolder"] = Path.Combine(root, "coordinator"),
            ["Orleans__SiloPort"] = FreePort.Next().ToString(),
            ["Orleans__GatewayPort"] = FreePort.Next().ToString(),
        }, coordinatorHttp, coordinatorGrpc);
        await worker.WaitForHealthAsync(ready: true, TimeSpan.FromSeconds(60));

        using var leave = new HttpRequestMessage(HttpMethod.Post, "/workers/lifecycle-0/leave");
        leave.Headers.Authorization = new AuthenticationHeaderValue("Bearer", Token);
        Assert.Equal(HttpStatusCode.Accepted, (await coordinator.Http.SendAsync(leave)).StatusCode);
        await worker.WaitForOutputAsync("staying out of it until stopped", TimeSpan.FromSeconds(30));
        await worker.WaitForHealthAsync(ready: false, TimeSpan.FromSeconds(30));
        Assert.False(worker.HasExited);
        Assert.Equal(HttpStatusCode.OK, (await worker.Http.GetAsync("/alive")).StatusCode);
        // The Coordinator sees it offline, and it stays so: the process does not say Hello again.
        var until = DateTime.UtcNow.AddSeconds(30);
        while (await OnlineAsync(coordinator, "lifecycle-0"))
        {
            Assert.True(DateTime.UtcNow < until, "the Coordinator still lists the worker online 30 s after it left");
            await Task.Delay(100);
        }
        Assert.DoesNotContain("rejoining", worker.Output);
        Assert.Equal(0, await worker.TerminateAsync(TimeSpan.FromSeconds(30)));
        Assert.False(await OnlineAsync(coordinator, "lifecycle-0"));
    }

    static async Task<bool> OnlineAsync(ServiceProcess coordinator, string id)
    {
        using var workers = JsonDocument.Parse(await coordinator.Http.GetStringAsync("/workers"));
        return workers.RootElement.EnumerateArray().Single(w => w.GetProperty("workerId").GetString() == id).GetProperty("online").GetBoolean();
    }
}
