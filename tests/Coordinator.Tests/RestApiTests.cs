using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.DependencyInjection;

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

    /// <summary>
    /// A field the spec does not have (DeepSpeed's "zero_stage", a misspelt "activationCheckpoint") would otherwise be
    /// dropped and the job train without it: it is refused naming the field's path, as is a value of the wrong type.
    /// </summary>
    [Theory]
    [InlineData("""{"parallel": {"zero_stage": 2}}""", "'zero_stage'", "$.parallel.zero_stage")]
    [InlineData("""{"activationCheckpoint": "full"}""", "'activationCheckpoint'", "$.activationCheckpoint")]
    [InlineData("""{"parallel": {"zero": "two"}}""", "System.Int32", "$.parallel.zero")]
    public async Task AFieldTheSpecDoesNotHaveOrAWrongTypeIsRefusedNamingItsPath(string extra, string named, string path)
    {
        var spec = System.Text.Json.Nodes.JsonNode.Parse(JsonSerializer.Serialize(TestSpecs.Tiny() with { Name = "unknown-field-job" }, JobSpecJson.Options))!.AsObject();
        foreach (var (key, value) in System.Text.Json.Nodes.JsonNode.Parse(extra)!.AsObject().ToList())
            if (spec[key] is System.Text.Json.Nodes.JsonObject inner && value is System.Text.Json.Nodes.JsonObject add)
                foreach (var (k, v) in add.ToList()) inner[k] = v?.DeepClone();
            else spec[key] = value?.DeepClone();
        var request = Authorized(HttpMethod.Post, "/jobs");
        request.Content = new StringContent(spec.ToJsonString(), System.Text.Encoding.UTF8, "application/json");
        using var response = await Http.SendAsync(request);
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        using var body = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        string problem = body.RootElement.GetProperty("errors").GetProperty("body")[0].GetString()!;
        Assert.True(problem.Contains(named) && problem.Contains(path), $"expected {named} and {path} in: {problem}");
        using var unknown = await Http.GetAsync("/jobs/unknown-field-job");
        Assert.Equal(HttpStatusCode.NotFound, unknown.StatusCode); // nothing was created
    }

    [Fact]
    public async Task WritesWithoutTheTokenAreRefusedLoggedAndCounted()
    {
        // The counter as this host's /metrics exports it, read from its own meter: other hosts and silos of this test
        // process create meters of the same name, and a scrape of /metrics cannot tell their series apart.
        var refusals = new ConcurrentDictionary<string, long>();
        var factory = fixture.Host.Services.GetRequiredService<IMeterFactory>();
        fixture.Host.Services.GetRequiredService<CoordinatorMetrics>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (ReferenceEquals(instrument.Meter.Scope, factory) && instrument.Name == "deepseek_coordinator_auth_refusals") l.EnableMeasurementEvents(instrument);
        };
        listener.SetMeasurementEventCallback<long>((_, value, tags, _) =>
        {
            string surface = "", reason = "";
            foreach (var t in tags) { if (t.Key == "surface") surface = (string)t.Value!; else if (t.Key == "reason") reason = (string)t.Value!; }
            refusals.AddOrUpdate($"{surface}/{reason}", value, (_, sum) => sum + value);
        });
        listener.Start();

        using var noToken = await Http.PostAsJsonAsync("/jobs", TestSpecs.Tiny());
        Assert.Equal(HttpStatusCode.Unauthorized, noToken.StatusCode);
        var wrong = new HttpRequestMessage(HttpMethod.Post, "/jobs/any/stop");
        wrong.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "not-the-token");
        using var wrongToken = await Http.SendAsync(wrong);
        Assert.Equal(HttpStatusCode.Unauthorized, wrongToken.StatusCode);

        // Counted: one refusal of each reason on the REST surface (the tests of this collection run one at a time).
        Assert.Equal(1, refusals.GetValueOrDefault("rest/missing"));
        Assert.Equal(1, refusals.GetValueOrDefault("rest/wrong"));
        // Logged: one warning per refusal naming the request and the reason, never the presented value.
        Assert.Contains(fixture.Host.Logs, l => l.StartsWith("Warning: Refused POST /jobs from ") && l.Contains("missing cluster token"));
        Assert.Contains(fixture.Host.Logs, l => l.StartsWith("Warning: Refused POST /jobs/any/stop from ") && l.Contains("wrong cluster token"));
        Assert.DoesNotContain(fixture.Host.Logs, l => l.Contains("not-the-token"));
        // /metrics over HTTP/1.1, as Prometheus scrapes it: the counter is exported, the token appears nowhere in it.
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
