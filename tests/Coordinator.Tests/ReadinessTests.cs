// The Coordinator clustered through a real redis-server: Ready (/health 200) while Redis answers, not Ready while the
// redis-server process is gone, Ready again once it is back; alive (/alive 200) throughout, since liveness must never
// depend on Redis (k8s/base/coordinator.yaml). Each transition is awaited by polling the endpoint Kubernetes probes.
using System.Net;

namespace DeepSeekCluster.Coordinator.Tests;

public class ReadinessTests
{
    [Fact]
    public async Task TheCoordinatorIsNotReadyWhileRedisIsDownAndReadyWhenItReturns()
    {
        // Persistent, so the silo finds its own membership row after the restart, as with a managed Redis.
        string data = TestSpecs.TempFolder();
        RedisServer? redis = await RedisServer.StartAsync(dataFolder: data);
        try
        {
            await using var coordinator = await CoordinatorHost.StartAsync(new Dictionary<string, string?>
            {
                ["ConnectionStrings:orleans-redis"] = redis.ConnectionString,
            });
            await AwaitStatus(coordinator.Http, "/health", HttpStatusCode.OK, "with Redis up");
            Assert.Equal(HttpStatusCode.OK, (await coordinator.Http.GetAsync("/alive")).StatusCode);

            int port = redis.Port;
            redis.Dispose(); // SIGKILL: Redis is gone
            redis = null;
            await AwaitStatus(coordinator.Http, "/health", HttpStatusCode.ServiceUnavailable, "with Redis down");
            Assert.Equal(HttpStatusCode.OK, (await coordinator.Http.GetAsync("/alive")).StatusCode);

            redis = await RedisServer.StartAsync(port, data);
            await AwaitStatus(coordinator.Http, "/health", HttpStatusCode.OK, "after Redis came back");
            Assert.Equal(HttpStatusCode.OK, (await coordinator.Http.GetAsync("/alive")).StatusCode);
        }
        finally { redis?.Dispose(); }
    }

    /// <summary>Polls like a readiness probe until <paramref name="path"/> answers <paramref name="expected"/>, or fails after 60 s.</summary>
    static async Task AwaitStatus(HttpClient http, string path, HttpStatusCode expected, string when)
    {
        var until = DateTime.UtcNow.AddSeconds(60);
        HttpStatusCode last = default;
        string body = "";
        while (DateTime.UtcNow < until)
        {
            using var response = await http.GetAsync(path);
            (last, body) = (response.StatusCode, await response.Content.ReadAsStringAsync());
            if (last == expected) return;
            await Task.Delay(200);
        }
        Assert.Fail($"{path} answered {(int)last} {body} {when}, expected {(int)expected} within 60 s");
    }
}
