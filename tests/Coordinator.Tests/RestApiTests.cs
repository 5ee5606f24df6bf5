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
        double missingBefore = await RestRefusalsAsync("missing"), wrongBefore = await RestRefusalsAsync("wrong");
        using var noToken = await Http.PostAsJsonAsync("/jobs", TestSpecs.Tiny());
        Assert.Equal(HttpStatusCode.Unauthorized, noToken.StatusCode);
        var wrong = new HttpRequestMessage(HttpMethod.Post, "/jobs/any/stop");
        wrong.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "not-the-token");
        using var wrongToken = await Http.SendAsync(wrong);
        Assert.Equal(HttpStatusCode.Unauthorized, wrongToken.StatusCode);

        // Counted: one more refusal of each reason on /metrics (over HTTP/1.1, as Prometheus scrapes it). The tests of this
        // collection run one at a time, so nothing else refuses on the REST surface meanwhile.
        await TestSpecs.EventuallyAsync(async () => (await RestRefusalsAsync("missing"), await RestRefusalsAsync("wrong")),
            n => n == (missingBefore + 1, wrongBefore + 1), $"the REST refusal counters to grow by one each from ({missingBefore}, {wrongBefore})");
        // Logged: one warning per refusal naming the request and the reason, never the presented value.
        Assert.Contains(fixture.Host.Logs, l => l.StartsWith("Warning: Refused POST /jobs from ") && l.Contains("missing cluster token"));
        Assert.Contains(fixture.Host.Logs, l => l.StartsWith("Warning: Refused POST /jobs/any/stop from ") && l.Contains("wrong cluster token"));
        Assert.DoesNotContain(fixture.Host.Logs, l => l.Contains("not-the-token"));
        Assert.DoesNotContain(CoordinatorHost.Token, await Http.GetStringAsync("/metrics"));
        Assert.Equal(HttpStatusCode.OK, (await Http.GetAsync("/alive")).StatusCode);
    }

    /// <summary>deepseek_coordinator_auth_refusals for surface="rest" and <paramref name="reason"/> on /metrics; 0 before the first.</summary>
    async Task<double> RestRefusalsAsync(string reason)
    {
        string metrics = await Http.GetStringAsync("/metrics");
        var line = metrics.Split('\n').FirstOrDefault(l => l.StartsWith("deepseek_coordinator_auth_refusals") && !l.StartsWith('#')
            && l.Contains("surface=\"rest\"") && l.Contains($"reason=\"{reason}\""));
        return line is null ? 0 : double.Parse(line[(line.LastIndexOf('}') + 1)..].Trim().Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
    }

    [Fact]
    public async Task AJobSubmittedWithTheTokenCanBeReadListedAndStopped()
    {
        var request = Authorized(HttpMethod.Post, "/jobs");
        request.Content = JsonContent.Create(TestSpecs.Tiny(minWorkers: 50, maxWorkers: 50) with { Name = "rest-job", GlobalBatch = 100 }, options: CoordinatorJson.Options);
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
