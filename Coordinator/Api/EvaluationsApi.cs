// REST for evaluation jobs: POST /evaluations scores a committed checkpoint on free workers (cluster token); GET reads one.
using System.Security.Cryptography;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public static class EvaluationsApi
{
    public static IEndpointRouteBuilder MapEvaluationsApi(this IEndpointRouteBuilder app)
    {
        app.MapPost("/evaluations", async (HttpRequest request, IGrainFactory grains, TimeProvider clock) =>
        {
            EvaluationSpec? spec;
            try { spec = await request.ReadFromJsonAsync<EvaluationSpec>(request.HttpContext.RequestAborted); }
            catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException)
            {
                return Invalid(new() { ["body"] = [$"expected {{\"job\", \"step\", \"tasks\", \"limit\", \"workers\"}}: {e.Message}"] });
            }
            if (spec is null) return Invalid(new() { ["body"] = ["expected {\"job\", \"step\", \"tasks\", \"limit\", \"workers\"}"] });
            if (spec.Validate() is { Count: > 0 } problems)
                return Invalid(problems.GroupBy(p => p.Field).ToDictionary(g => g.Key, g => g.Select(p => p.Message).ToArray()));
            string id = $"eval-{spec.Job}-{spec.Step}-{clock.GetUtcNow():yyyyMMddHHmmss}-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(3))}";
            var outcome = await grains.GetGrain<IEvaluationGrain>(id).StartAsync(spec);
            return outcome.Refusal switch
            {
                ExportRefusal.None => Results.Accepted($"/evaluations/{id}", outcome.Record),
                ExportRefusal.NotFound => Results.NotFound(new { error = outcome.Reason }),
                ExportRefusal.Invalid => Invalid(new() { ["body"] = [outcome.Reason] }),
                _ => Results.Conflict(new { error = outcome.Reason }),
            };
        }).AddEndpointFilter<RequireClusterToken>();

        app.MapGet("/evaluations/{id}", async (string id, IGrainFactory grains) =>
            id.StartsWith("eval-", StringComparison.Ordinal) && await grains.GetGrain<IEvaluationGrain>(id).GetAsync() is { } record
                ? Results.Ok(record)
                : Results.NotFound(new { error = $"no evaluation '{id}'" }));
        return app;
    }

    static IResult Invalid(Dictionary<string, string[]> errors) => Results.ValidationProblem(errors, title: "invalid evaluation request");
}
