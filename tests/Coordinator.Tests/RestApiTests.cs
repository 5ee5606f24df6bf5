using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(CoordinatorCollection.Name)]
public class RestApiTests(CoordinatorFixture fixture)
{
    HttpClient Http => fixture.Host.Http;

    [Fact]
    public async Task AnInvalidSpecIsRefusedWithEveryProblemNamed()
    {
        var request = Authorized(HttpMethod.Post, "/jobs");
        request.Content = JsonContent.Create(new { globalBatch = 10, microBatch = 3, steps = 0, minWorkers = 3, maxWorkers = 1 });
        using var response = await Http.SendAsync(request);
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        using var body = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        var fields = body.RootElement.GetProperty("errors").EnumerateObject().Select(p => p.Name).ToHashSet();
        Assert.Empty(new[] { "modelPreset", "dataset", "microBatch", "seqLen", "steps", "maxWorkers" }.Except(fields));
    }

    [Fact]
    public async Task WritesWithoutTheTokenAreRefusedLoggedAndCounted()
    {
        using var noToken = await Http.PostAsJsonAsync("/jobs", TestSpecs.Tiny());
        Assert.Equal(HttpStatusCode.Unauthorized, noToken.StatusCode);
        var wrong = new HttpRequestMessage(HttpMethod.Post, "/jobs/any/stop");
        wrong.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "not-the-token");
        using var wrongToken = await Http.SendAsync(wrong);
        Assert.Equal(HttpStatusCode.Unauthorized, wrongToken.StatusCode);

        // /metrics over HTTP/1.1, as Prometheus scrapes it; the token appears nowhere in it.
        string metrics = await TestSpecs.EventuallyAsync(() => Http.GetStringAsync("/metrics"),
            m => m.Contains("deepseek_coordinator_auth_refusals"), "the refusal counter on /metrics");
        Assert.DoesNotContain(CoordinatorHost.Token, metrics);
        Assert.Equal(HttpStatusCode.OK, (await Http.GetAsync("/alive")).StatusCode);
    }

    [Fact]
    public async Task AJobSubmittedWithTheTokenCanBeReadListedAndStopped()
    {
        var request = Authorized(HttpMethod.Post, "/jobs");
        request.Content = JsonContent.Create(TestSpecs.Tiny(minWorkers: 50, maxWorkers: 50) with { Name = "rest-job", GlobalBatch = 100 }, options: DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        using var created = await Http.SendAsync(request);
        Assert.True(created.StatusCode == HttpStatusCode.Created, await created.Content.ReadAsStringAsync());

        using var job = JsonDocument.Parse(await Http.GetStringAsync("/jobs/rest-job"));
        Assert.Equal("forming", job.RootElement.GetProperty("state").GetString());
        Assert.Contains("rest-job", await Http.GetStringAsync("/jobs"));
        Assert.Equal(HttpStatusCode.NotFound, (await Http.GetAsync("/jobs/no-such-job")).StatusCode);

        using var stopped = await Http.SendAsync(Authorized(HttpMethod.Post, "/jobs/rest-job/stop"));
        using var body = JsonDocument.Parse(await stopped.Content.ReadAsStringAsync());
        Assert.Equal("stopped", body.RootElement.GetProperty("state").GetString());
        Assert.DoesNotContain(CoordinatorHost.Token, body.RootElement.GetRawText());
    }

    static HttpRequestMessage Authorized(HttpMethod method, string path)
    {
        var request = new HttpRequestMessage(method, path);
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", CoordinatorHost.Token);
        return request;
    }
}
