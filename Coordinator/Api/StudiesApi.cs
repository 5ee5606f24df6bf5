// REST for studies: create, list, show, stop. Reads are open; writes need the cluster token (as for jobs).
using System.Security.Cryptography;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public static class StudiesApi
{
    /// <summary>One line of GET /studies.</summary>
    public sealed record StudySummary(string StudyId, StudyState State, int Trials, int Running, int Pruned, string? BestJobId, double? BestMetric);

    public static IEndpointRouteBuilder MapStudiesApi(this IEndpointRouteBuilder app)
    {
        // The body is read inside the handler, after the token filter, so an unauthenticated caller learns nothing about it.
        app.MapPost("/studies", async (HttpRequest request, IGrainFactory grains, TimeProvider clock) =>
        {
            string body = await new StreamReader(request.Body).ReadToEndAsync(request.HttpContext.RequestAborted);
            string? name;
            try { name = StudyStatus.ParseSubmittedSpec(body)?.Name; }
            catch (System.Text.Json.JsonException e) { return Results.ValidationProblem(new Dictionary<string, string[]> { ["body"] = [$"not a study spec JSON object: {JobSpecJson.Problem(e)}"] }, title: "invalid study spec"); }
            string id = string.IsNullOrWhiteSpace(name) ? $"study-{clock.GetUtcNow():yyyyMMdd-HHmmss}-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(3))}" : name;
            try
            {
                var status = await grains.GetGrain<IStudyGrain>(id).CreateAsync(body);
                return Results.Created($"/studies/{id}", status);
            }
            catch (JobSpecInvalidException e) { return Results.ValidationProblem(JobSubmission.ByField(e.Problems), title: "invalid study spec"); }
            catch (InvalidOperationException e) { return Results.Conflict(new { error = e.Message }); }
        }).AddEndpointFilter<RequireClusterToken>();

        app.MapGet("/studies", async (IGrainFactory grains) =>
        {
            var ids = await grains.GetGrain<IStudyIndexGrain>(IStudyIndexGrain.Key).ListAsync();
            var all = await Task.WhenAll(ids.Select(id => grains.GetGrain<IStudyGrain>(id).GetStatusAsync()));
            return all.Select(s => new StudySummary(s.StudyId, s.State, s.Trials.Length, s.Trials.Count(t => t.State == TrialState.Running),
                s.Trials.Count(t => t.State == TrialState.Pruned), s.Best?.JobId, s.Best?.Metric));
        });

        app.MapGet("/studies/{id}", async (string id, IGrainFactory grains) =>
            await Find(grains, id) is { } status ? Results.Ok(status) : Results.NotFound(new { error = $"no study '{id}'" }));

        app.MapPost("/studies/{id}/stop", async (string id, IGrainFactory grains) =>
            await Find(grains, id) is null
                ? Results.NotFound(new { error = $"no study '{id}'" })
                : Results.Ok(await grains.GetGrain<IStudyGrain>(id).StopAsync()))
            .AddEndpointFilter<RequireClusterToken>();
        return app;
    }

    static async Task<StudyStatus?> Find(IGrainFactory grains, string id)
    {
        if (!JobSpec.IsValidName(id)) return null;
        var status = await grains.GetGrain<IStudyGrain>(id).GetStatusAsync();
        return status.SpecJson.Length == 0 ? null : status;
    }
}
