// REST for studies on a real Coordinator host: writes need the token, an invalid spec names its fields, a study lists and stops.
using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

[Collection(CoordinatorCollection.Name)]
public class StudiesApiTests(CoordinatorFixture fixture)
{
    HttpClient Http => fixture.Host.Http;

    static HttpRequestMessage Post(string path, string? body, bool token = true)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, path);
        if (token) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", CoordinatorHost.Token);
        if (body is not null) request.Content = new StringContent(body, Encoding.UTF8, "application/json");
        return request;
    }

    /// <summary>POST /studies reads the base job as POST /jobs reads a job: "zero_stage" is refused naming its path, not dropped.</summary>
    [Fact]
    public async Task AStudyWhoseBaseJobHasAFieldTheJobSpecDoesNotHaveIsRefusedNamingItsPath()
    {
        var spec = System.Text.Json.Nodes.JsonNode.Parse(SyntheticStudies.Json(SyntheticStudies.Spec("random", 1) with { Name = "unknown-field-study" }))!;
        spec["job"]!["parallel"]!["zero_stage"] = 2;
        using var refused = await Http.SendAsync(Post("/studies", spec.ToJsonString()));
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
        using var body = JsonDocument.Parse(await refused.Content.ReadAsStringAsync());
        string problem = body.RootElement.GetProperty("errors").GetProperty("body")[0].GetString()!;
        Assert.True(problem.Contains("'zero_stage'") && problem.Contains("$.job.parallel.zero_stage"), problem);
        Assert.Equal(HttpStatusCode.NotFound, (await Http.GetAsync("/studies/unknown-field-study")).StatusCode); // nothing was created
    }

    [Fact]
    public async Task AStudyIsCreatedListedShownAndStoppedAndWritesNeedTheToken()
    {
        string spec = SyntheticStudies.Json(SyntheticStudies.Spec("tpe", 3, "asha", trials: 4) with { Name = "rest-study", Concurrency = 1 });
        using (var refused = await Http.SendAsync(Post("/studies", spec, token: false)))
            Assert.Equal(HttpStatusCode.Unauthorized, refused.StatusCode);

        using (var invalid = await Http.SendAsync(Post("/studies", """{"job": {"steps": 0}, "space": [{"path": "nope", "kind": "uniform", "low": 0, "high": 1}], "sampler": {"kind": "bayes"}}""")))
        {
            Assert.Equal(HttpStatusCode.BadRequest, invalid.StatusCode);
            using var body = JsonDocument.Parse(await invalid.Content.ReadAsStringAsync());
            var fields = body.RootElement.GetProperty("errors").EnumerateObject().Select(p => p.Name).ToHashSet();
            Assert.Empty(new[] { "job.steps", "job.dataset", "space[0].path", "sampler.kind" }.Except(fields));
        }

        using (var created = await Http.SendAsync(Post("/studies", spec)))
        {
            Assert.Equal(HttpStatusCode.Created, created.StatusCode);
            Assert.Equal("/studies/rest-study", created.Headers.Location!.OriginalString);
        }
        using (var again = await Http.SendAsync(Post("/studies", spec))) Assert.Equal(HttpStatusCode.Conflict, again.StatusCode);

        using var list = JsonDocument.Parse(await Http.GetStringAsync("/studies"));
        Assert.Contains(list.RootElement.EnumerateArray(), s => s.GetProperty("studyId").GetString() == "rest-study");
        using var shown = JsonDocument.Parse(await Http.GetStringAsync("/studies/rest-study"));
        var trial = shown.RootElement.GetProperty("trials")[0];
        Assert.Equal("rest-study-t000", trial.GetProperty("jobId").GetString());
        Assert.True(trial.GetProperty("parameters").TryGetProperty("schedule.peakLr", out _));
        Assert.Equal(2, shown.RootElement.GetProperty("rungs").GetArrayLength()); // asha: steps 10 and 30 below 90
        Assert.Equal(HttpStatusCode.NotFound, (await Http.GetAsync("/studies/no-such-study")).StatusCode);

        using (var stop = await Http.SendAsync(Post("/studies/rest-study/stop", null)))
        {
            Assert.Equal(HttpStatusCode.OK, stop.StatusCode);
            using var stopped = JsonDocument.Parse(await stop.Content.ReadAsStringAsync());
            Assert.Equal("stopped", stopped.RootElement.GetProperty("state").GetString());
        }
        using var job = JsonDocument.Parse(await Http.GetStringAsync("/jobs/rest-study-t000"));
        Assert.Equal("stopped", job.RootElement.GetProperty("state").GetString()); // its trial stopped with it
    }
}
