// A job's exports (key: job id): checks a request against the job's committed checkpoints, holds a free worker for it in
// the registry (under a key of its own, so no job claims that worker meanwhile), orders the export down the worker's
// control stream and records how it ended. It does not export: the worker does (GpuWorker/Cluster/CheckpointExport.cs).
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Exports;

[GenerateSerializer]
public sealed class JobExportsGrainState
{
    [Id(0)] public List<ExportRecord> Exports { get; set; } = [];
}

public sealed class JobExportsGrain(
    [PersistentState("exports")] IPersistentState<JobExportsGrainState> exports,
    TimeProvider clock,
    ILogger<JobExportsGrain> logger) : Grain, IJobExportsGrain
{
    List<ExportRecord> Records => exports.State.Exports;
    string JobId => this.GetPrimaryKeyString();
    IClusterRegistryGrain Registry => GrainFactory.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);
    ITrainingJobGrain Job => GrainFactory.GetGrain<ITrainingJobGrain>(JobId);

    /// <summary>What the registry records as the holder of the export's worker (a job id cannot contain ':').</summary>
    string HoldKey(long step, string format) => $"export:{JobId}:{step}:{format}";

    public async Task<ExportRequestOutcome> RequestAsync(long step, string format)
    {
        if (!ExportFormats.All.Contains(format))
            return Refused(ExportRefusal.Invalid, $"format '{format}' is not an export format: expected one of {string.Join(", ", ExportFormats.All)}");
        if (step <= 0) return Refused(ExportRefusal.Invalid, $"step {step} must be a positive checkpoint step");
        var status = await Job.GetStatusAsync();
        if (CommittedStep.Check(status, JobId, step) is { } refusal) return Refused(refusal.Kind, refusal.Reason);
        if (Records.LastOrDefault(r => r.Step == step && r.Format == format) is { State: not ExportStates.Failed } existing)
            return Refused(ExportRefusal.Conflict, existing.State == ExportStates.Done
                ? $"step {step} of job '{JobId}' is already exported as {format}: {existing.ManifestKey}"
                : $"step {step} of job '{JobId}' is already being exported as {format} by worker {existing.WorkerId}");

        string hold = HoldKey(step, format);
        var claimed = await Registry.ClaimWorkersAsync(hold, 1);
        if (claimed.Length == 0)
            return Refused(ExportRefusal.Conflict, "no free worker: every online worker is in a job (GET /workers); ask again when one is free");
        string workerId = claimed[0].WorkerId;
        if (!await GrainFactory.GetGrain<IGpuWorkerGrain>(workerId).OrderExportAsync(new ExportOrder(JobId, step, format, status.Spec!.Dataset)))
        {
            await Registry.ReleaseWorkersAsync(hold, null);
            return Refused(ExportRefusal.Conflict, $"no free worker: worker {workerId} went offline as it was ordered the export; ask again");
        }
        var record = new ExportRecord { Job = JobId, Step = step, Format = format, WorkerId = workerId, RequestedAt = clock.GetUtcNow() };
        Records.Add(record);
        await exports.WriteStateAsync();
        await Job.RecordEventAsync(JobEventKinds.ExportStarted, $"export of step {step} as {format} started on worker {workerId}", null);
        return new ExportRequestOutcome(record, ExportRefusal.None, "");
    }

    public async Task FinishedAsync(string workerId, long step, string format, string? error, string? manifestKey, int files, long bytes)
    {
        int i = Records.FindLastIndex(r => r.Step == step && r.Format == format && r.WorkerId == workerId && r.State == ExportStates.Running);
        if (i < 0)
        {
            logger.LogWarning("Job {Job}: worker {Worker} finished an export of step {Step} as {Format} that is not running here; ignored", JobId, workerId, step, format);
            return;
        }
        var now = clock.GetUtcNow();
        Records[i] = error is null
            ? Records[i] with { State = ExportStates.Done, FinishedAt = now, ManifestKey = manifestKey, Files = files, Bytes = bytes }
            : Records[i] with { State = ExportStates.Failed, FinishedAt = now, Error = error };
        await exports.WriteStateAsync();
        await Registry.ReleaseWorkersAsync(HoldKey(step, format), null);
        var r = Records[i];
        double seconds = (now - r.RequestedAt).TotalSeconds;
        if (error is null)
            await Job.RecordEventAsync(JobEventKinds.Exported, $"step {step} exported as {format} by worker {workerId} in {seconds:0.#} s: {files} files, {bytes} bytes ({manifestKey})", null);
        else
            await Job.RecordEventAsync(JobEventKinds.ExportFailed, $"export of step {step} as {format} on worker {workerId} failed: {error}", error);
    }

    public async Task WorkerLostAsync(string workerId, string reason)
    {
        foreach (var r in Records.Where(r => r.WorkerId == workerId && r.State == ExportStates.Running).ToList())
            await FinishedAsync(workerId, r.Step, r.Format, $"the worker's control stream ended before the export finished ({reason})", null, 0, 0);
    }

    public Task<ExportRecord[]> ListAsync() => Task.FromResult(Records.ToArray());

    static ExportRequestOutcome Refused(ExportRefusal kind, string reason) => new(null, kind, reason);
}
