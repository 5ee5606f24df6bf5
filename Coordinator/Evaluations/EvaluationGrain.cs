// One evaluation job (key: evaluation id): checks the request against the job's committed checkpoints, holds the free
// workers it needs in the registry, orders each its share (with the ring that gathers the shares) and records the
// results, which rank 0 combines. The results join the training job's record (its status, events, status page).
using System.Security.Cryptography;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Exports;
using DeepSeekCluster.Coordinator.Grains;

namespace DeepSeekCluster.Coordinator.Evaluations;

[GenerateSerializer]
public sealed class EvaluationGrainState
{
    [Id(0)] public EvaluationRecord? Record { get; set; }
}

public sealed class EvaluationGrain(
    [PersistentState("evaluation")] IPersistentState<EvaluationGrainState> evaluation,
    TimeProvider clock,
    ILogger<EvaluationGrain> logger) : Grain, IEvaluationGrain
{
    string Id => this.GetPrimaryKeyString();
    /// <summary>What the registry records as the holder of this evaluation's workers (a job id cannot contain ':').</summary>
    string HoldKey => $"evaluation:{Id}";
    IClusterRegistryGrain Registry => GrainFactory.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);

    public async Task<EvaluationOutcome> StartAsync(EvaluationSpec spec)
    {
        if (evaluation.State.Record is not null) return Refused(ExportRefusal.Conflict, $"evaluation '{Id}' exists");
        if (spec.Validate() is { Count: > 0 } problems)
            return Refused(ExportRefusal.Invalid, string.Join("; ", problems.Select(p => $"{p.Field}: {p.Message}")));
        var job = GrainFactory.GetGrain<ITrainingJobGrain>(spec.Job);
        var status = await job.GetStatusAsync();
        // An export outlives retention and the job's end writes one itself: whether it exists is the store's to say (the workers ask it).
        if (spec.Export is null && CommittedStep.Check(status, spec.Job, spec.Step) is { } refusal) return Refused(refusal.Kind, refusal.Reason);
        if (status.Spec is null) return Refused(ExportRefusal.NotFound, $"no job '{spec.Job}'");

        var claimed = await Registry.ClaimWorkersAsync(HoldKey, spec.Workers);
        if (claimed.Length < spec.Workers)
        {
            await Registry.ReleaseWorkersAsync(HoldKey, null);
            return Refused(ExportRefusal.Conflict, $"no free workers: {spec.Workers} asked, {claimed.Length} free (GET /workers); ask again when they are free");
        }
        var peers = claimed.Select(c => c.CollectiveEndpoint).ToArray();
        var key = RandomNumberGenerator.GetBytes(32);
        var record = new EvaluationRecord { Id = Id, Spec = spec, Workers = [.. claimed.Select(c => c.WorkerId)], RequestedAt = clock.GetUtcNow() };
        evaluation.State.Record = record;
        await evaluation.WriteStateAsync();
        for (int rank = 0; rank < claimed.Length; rank++)
        {
            var order = new EvaluationOrder(Id, spec.Job, spec.Step, status.Spec!.Dataset, spec.Tasks, spec.Limit, Math.Max(1, status.Spec.MicroBatch),
                                            rank, claimed.Length, peers, key, spec.Export);
            if (!await GrainFactory.GetGrain<IGpuWorkerGrain>(claimed[rank].WorkerId).OrderEvaluationAsync(order))
            {
                // The ranks already ordered fail on the ring (no peer at this rank's endpoint) within the collective timeout,
                // and are let go as they report; the others never got work.
                await Registry.ReleaseWorkersAsync(HoldKey, [.. record.Workers.Skip(rank)]);
                evaluation.State.Record = record with { Finished = [.. Enumerable.Range(rank, claimed.Length - rank)] };
                await FailAsync($"worker {claimed[rank].WorkerId} went offline as it was ordered rank {rank}");
                return new EvaluationOutcome(evaluation.State.Record, ExportRefusal.None, "");
            }
        }
        await job.RecordEventAsync(JobEventKinds.EvaluationStarted,
            $"evaluation {Id} of step {spec.Step}{(spec.Export is { } x ? $" (its {x} export)" : "")} on {string.Join(", ", spec.Tasks)} started on {claimed.Length} worker(s): {string.Join(", ", record.Workers)}", null);
        return new EvaluationOutcome(record, ExportRefusal.None, "");
    }

    public async Task FinishedAsync(string workerId, int rank, string? resultsJson, string? error)
    {
        if (evaluation.State.Record is not { } r || rank < 0 || rank >= r.Workers.Length || r.Workers[rank] != workerId || r.Finished.Contains(rank))
        {
            logger.LogWarning("Evaluation {Evaluation}: an end from worker {Worker} (rank {Rank}) that it does not wait for; ignored", Id, workerId, rank);
            return;
        }
        // Each worker is let go as its rank ends, not before: a rank still in the ring must not be handed new work.
        evaluation.State.Record = r = r with { Finished = [.. r.Finished.Append(rank).Order()] };
        await evaluation.WriteStateAsync();
        await Registry.ReleaseWorkersAsync(HoldKey, [workerId]);
        if (r.State != EvaluationStates.Running) return;
        if (error is not null)
        {
            await FailAsync($"rank {rank} (worker {workerId}): {error}");
            return;
        }
        if (rank == 0)
        {
            try { evaluation.State.Record = r = r with { ResultsJson = resultsJson, Scores = [.. EvaluationResults.Parse(r.Spec.Step, resultsJson ?? "")] }; }
            catch (InvalidDataException e)
            {
                await FailAsync($"rank 0's results: {e.Message}");
                return;
            }
        }
        if (r.Finished.Length < r.Workers.Length)
        {
            await evaluation.WriteStateAsync();
            return;
        }
        evaluation.State.Record = r = r with { State = EvaluationStates.Done, FinishedAt = clock.GetUtcNow() };
        await evaluation.WriteStateAsync();
        string scores = string.Join("; ", r.Scores.Select(s => $"{s.Task} {s.Metric} {s.Value:0.####}"));
        await GrainFactory.GetGrain<ITrainingJobGrain>(r.Spec.Job).RecordEvaluationAsync(r.Spec.Step, r.Scores,
            $"evaluation {Id} of step {r.Spec.Step} on {r.Workers.Length} worker(s): {scores}");
    }

    public async Task WorkerLostAsync(string workerId, string reason)
    {
        if (evaluation.State.Record is not { } r || Array.IndexOf(r.Workers, workerId) is var rank && (rank < 0 || r.Finished.Contains(rank))) return;
        await FinishedAsync(workerId, rank, null, $"its control stream ended before its share was scored ({reason})");
    }

    public Task<EvaluationRecord?> GetAsync() => Task.FromResult(evaluation.State.Record);

    async Task FailAsync(string error)
    {
        var r = evaluation.State.Record!;
        evaluation.State.Record = r with { State = EvaluationStates.Failed, Error = error, FinishedAt = clock.GetUtcNow() };
        await evaluation.WriteStateAsync();
        await GrainFactory.GetGrain<ITrainingJobGrain>(r.Spec.Job).RecordEventAsync(JobEventKinds.EvaluationFailed,
            $"evaluation {Id} of step {r.Spec.Step} failed: {error}", error);
    }

    static EvaluationOutcome Refused(ExportRefusal kind, string reason) => new(null, kind, reason);
}
