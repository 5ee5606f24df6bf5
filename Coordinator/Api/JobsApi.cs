// REST for people and scripts: jobs and workers. Reads are open; writes need the cluster token.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public static class JobsApi
{
    public static IEndpointRouteBuilder MapJobsApi(this IEndpointRouteBuilder app)
    {
        // The body is read inside the handler, after the token filter, so an unauthenticated caller learns nothing about it.
        app.MapPost("/jobs", async (HttpRequest request, JobSubmission jobs) => await ReadSpecAsync(request) switch
        {
            (null, var error) => Results.ValidationProblem(new Dictionary<string, string[]> { ["body"] = [error!] }, title: "invalid job spec"),
            (var spec, _) => await jobs.SubmitAsync(spec) switch
        {
            JobSubmission.Accepted a => Results.Created($"/jobs/{a.Status.JobId}", a.Status),
            JobSubmission.Invalid i => Results.ValidationProblem(JobSubmission.ByField(i.Problems), title: "invalid job spec"),
            JobSubmission.Conflict c => Results.Conflict(new { error = c.Message }),
            _ => throw new InvalidOperationException("unknown submission outcome"),
        },
        }).AddEndpointFilter<RequireClusterToken>();

        app.MapGet("/jobs", async (IGrainFactory grains) =>
        {
            var ids = await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListJobsAsync();
            var all = await Task.WhenAll(ids.Select(id => grains.GetGrain<ITrainingJobGrain>(id).GetStatusAsync()));
            return all.Select(JobSummary.Of);
        });

        app.MapGet("/jobs/{id}", async (string id, JobSubmission jobs) =>
            await jobs.GetAsync(id) is { } status ? Results.Ok(status) : Results.NotFound(new { error = $"no job '{id}'" }));

        app.MapPost("/jobs/{id}/stop", async (string id, JobSubmission jobs, IGrainFactory grains) =>
            await jobs.GetAsync(id) is null
                ? Results.NotFound(new { error = $"no job '{id}'" })
                : Results.Ok(await grains.GetGrain<ITrainingJobGrain>(id).StopAsync()))
            .AddEndpointFilter<RequireClusterToken>();

        app.MapGet("/workers", async (IGrainFactory grains) =>
        {
            var ids = await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListWorkersAsync();
            return await Task.WhenAll(ids.Select(id => grains.GetGrain<IGpuWorkerGrain>(id).GetAsync()));
        });
        // Scale in: the worker finishes the step in flight, says Leaving and exits (with Worker:StayAfterLeave, as in
        // Kubernetes, it stays up and out of the cluster until stopped); its job re-forms without it.
        app.MapPost("/workers/{id}/leave", async (string id, IGrainFactory grains) =>
        {
            var ids = await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListWorkersAsync();
            if (!ids.Contains(id, StringComparer.Ordinal)) return Results.NotFound(new { error = $"no worker '{id}'" });
            return await grains.GetGrain<IGpuWorkerGrain>(id).LeaveAsync("asked to leave (POST /workers/{id}/leave)")
                ? Results.Accepted($"/workers", new { workerId = id, leaving = true })
                : Results.Conflict(new { error = $"worker '{id}' is offline; there is no process to ask" });
        }).AddEndpointFilter<RequireClusterToken>();
        return app;
    }

    static async Task<(JobSpec? Spec, string? Error)> ReadSpecAsync(HttpRequest request)
    {
        try
        {
            var spec = await request.ReadFromJsonAsync<JobSpec>(JobSpecJson.Submitted, request.HttpContext.RequestAborted);
            return spec is null ? (null, "expected a JobSpec JSON object") : (spec, null);
        }
        catch (System.Text.Json.JsonException e) { return (null, $"not a JobSpec JSON object: {JobSpecJson.Problem(e)}"); }
        catch (InvalidOperationException e) { return (null, $"not a JobSpec JSON object: {e.Message}"); }
    }
}
