// REST for exports of a job's committed checkpoints: POST orders one on a free worker (cluster token), GET lists them.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public static class ExportsApi
{
    /// <summary>The body of POST /jobs/{id}/exports.</summary>
    public sealed record ExportRequest(long? Step, string? Format);

    public static IEndpointRouteBuilder MapExportsApi(this IEndpointRouteBuilder app)
    {
        app.MapPost("/jobs/{id}/exports", async (string id, HttpRequest request, IGrainFactory grains) =>
        {
            if (!JobSpec.IsValidName(id)) return Results.NotFound(new { error = $"no job '{id}'" });
            ExportRequest? body;
            try { body = await request.ReadFromJsonAsync<ExportRequest>(request.HttpContext.RequestAborted); }
            catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException)
            {
                return Problem("body", $"expected a JSON object {{\"step\": N, \"format\": \"hf\"}}: {e.Message}");
            }
            if (body?.Step is not { } step) return Problem("step", "required: the committed checkpoint step to export");
            if (string.IsNullOrEmpty(body.Format)) return Problem("format", $"required: one of {string.Join(", ", ExportFormats.All)}");
            var outcome = await grains.GetGrain<IJobExportsGrain>(id).RequestAsync(step, body.Format);
            return outcome.Refusal switch
            {
                ExportRefusal.None => Results.Accepted($"/jobs/{id}/exports", outcome.Record),
                ExportRefusal.NotFound => Results.NotFound(new { error = outcome.Reason }),
                ExportRefusal.Invalid => Problem(outcome.Reason.StartsWith("format", StringComparison.Ordinal) ? "format" : "step", outcome.Reason),
                _ => Results.Conflict(new { error = outcome.Reason }),
            };
        }).AddEndpointFilter<RequireClusterToken>();

        app.MapGet("/jobs/{id}/exports", async (string id, JobSubmission jobs, IGrainFactory grains) =>
            await jobs.GetAsync(id) is null
                ? Results.NotFound(new { error = $"no job '{id}'" })
                : Results.Ok(await grains.GetGrain<IJobExportsGrain>(id).ListAsync()));
        return app;
    }

    static IResult Problem(string field, string message) =>
        Results.ValidationProblem(new Dictionary<string, string[]> { [field] = [message] }, title: "invalid export request");
}
