// REST for evaluation jobs: POST /evaluations scores a committed checkpoint on free workers (cluster token); GET reads one;
// GET /jobs/{id}/evaluations lists the scores the store keeps with a committed step or export.
using System.Security.Cryptography;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Checkpoints;
using Grpc.Core;

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

        // What the store keeps with a committed step (or its export): the evaluation jobs' results and the training job's own
        // scores at that checkpoint (id "training"), each the harness's results JSON as written.
        app.MapGet("/jobs/{id}/evaluations", async (string id, long? step, string? export, JobSubmission jobs, CheckpointCommitter committer, CancellationToken ct) =>
        {
            if (await jobs.GetAsync(id) is null) return Results.NotFound(new { error = $"no job '{id}'" });
            if (step is not { } s || s < 0) return Invalid(new() { ["step"] = ["required: ?step=N, the committed checkpoint step whose evaluations to list"] });
            if (committer.StoreClient is not { } store) return Results.Problem($"no checkpoint store is configured ({CheckpointCommitter.AddressKey})", statusCode: 503);
            try
            {
                var reply = await store.ListEvaluationsAsync(new ListEvaluationsRequest { Job = id, Step = s, ExportFormat = export ?? "" }, deadline: DateTime.UtcNow.AddSeconds(30), cancellationToken: ct);
                return Results.Ok(new
                {
                    job = id, step = s, export,
                    evaluations = reply.Evaluations.Select(e => new { id = e.EvaluationId, results = System.Text.Json.Nodes.JsonNode.Parse(e.ResultsJson) }),
                });
            }
            catch (RpcException e) when (e.StatusCode == StatusCode.NotFound) { return Results.NotFound(new { error = e.Status.Detail }); }
            catch (RpcException e) when (e.StatusCode == StatusCode.InvalidArgument) { return Invalid(new() { [export is null ? "step" : "export"] = [e.Status.Detail] }); }
            catch (RpcException e) { return Results.Problem($"the checkpoint store said {e.StatusCode}: {e.Status.Detail}", statusCode: 503); }
        });

        app.MapGet("/evaluations/{id}", async (string id, IGrainFactory grains) =>
            id.StartsWith("eval-", StringComparison.Ordinal) && await grains.GetGrain<IEvaluationGrain>(id).GetAsync() is { } record
                ? Results.Ok(record)
                : Results.NotFound(new { error = $"no evaluation '{id}'" }));
        return app;
    }

    static IResult Invalid(Dictionary<string, string[]> errors) => Results.ValidationProblem(errors, title: "invalid evaluation request");
}
