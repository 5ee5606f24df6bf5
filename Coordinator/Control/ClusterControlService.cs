// gRPC ClusterControl: each worker's Connect stream (hello, heartbeats and reports up; assignments and commands down)
// and job submission/status. The stream's end, however it ends, tells the worker grain at once.
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Api;
using Grpc.Core;
using CheckpointReport = DeepSeekCluster.Contracts.Grains.CheckpointReport;
using StepReport = DeepSeekCluster.Contracts.Grains.StepReport;

namespace DeepSeekCluster.Coordinator.Control;

public sealed class ClusterControlService(
    IGrainFactory grains,
    ClusterToken token,
    JobSubmission jobs,
    CoordinatorMetrics metrics,
    ILogger<ClusterControlService> logger) : ClusterControl.ClusterControlBase
{
    public override async Task Connect(IAsyncStreamReader<WorkerMessage> requests, IServerStreamWriter<CoordinatorMessage> responses, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requests.MoveNext(ct)) return;
        if (requests.Current.KindCase != WorkerMessage.KindOneofCase.Hello)
        {
            await Refuse(responses, "the first message must be Hello", ct);
            return;
        }
        var hello = requests.Current.Hello;
        string? presented = ClusterToken.FromAuthorization(context.RequestHeaders.GetValue("authorization")) ?? NullIfEmpty(hello.Token);
        if (!token.Matches(presented))
        {
            string reason = presented is null ? "missing" : "wrong";
            metrics.AuthRefused("grpc", reason);
            logger.LogWarning("Refused worker {Worker} from {Peer}: {Reason} cluster token", Printable(hello.WorkerId), context.Peer, reason);
            await Refuse(responses, "cluster token missing or wrong", ct);
            return;
        }
        if (!JobSpec.IsValidName(hello.WorkerId))
        {
            await Refuse(responses, $"worker id '{Printable(hello.WorkerId)}' must be 1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.'", ct);
            return;
        }

        var connection = new WorkerConnection();
        var observer = grains.CreateObjectReference<IWorkerControlObserver>(connection);
        var worker = grains.GetGrain<IGpuWorkerGrain>(hello.WorkerId);
        long number = await worker.RegisterAsync(new WorkerCapabilities
        {
            WorkerId = hello.WorkerId, Device = hello.Device, MemoryBytes = hello.MemoryBytes, Host = hello.Host,
            CollectiveEndpoint = hello.CollectiveEndpoint, PipelineEndpoint = hello.PipelineEndpoint, MetricsEndpoint = hello.MetricsEndpoint,
        }, observer, hello.JobId.Length > 0 && hello.Generation > 0 ? new TrainingPosition(hello.JobId, hello.Generation, hello.Rank) : null);
        // The worker's readiness waits for this: registered, on this stream (before any message, so the pump cannot race it).
        await context.WriteResponseHeadersAsync(new Metadata { { "deepseek-registered", "true" } });
        var pump = connection.PumpAsync(responses, ct);

        string why = "stream closed";
        var kind = LeaveKind.Lost;
        try
        {
            while (await requests.MoveNext(ct))
            {
                var message = requests.Current;
                // A failed run is reported, not a farewell: the process stays connected. Ending the stream here made the
                // failure of a generation already re-formed (refused as stale) take the worker out of the current one.
                if (message is { KindCase: WorkerMessage.KindOneofCase.Leaving, Leaving.Failed: true })
                {
                    if (connection.Current is { } a)
                        await Fenced(hello.WorkerId, connection, a.JobId, message.Leaving.Generation, "failure",
                            () => grains.GetGrain<ITrainingJobGrain>(a.JobId).FailAsync(message.Leaving.Generation, $"worker {hello.WorkerId}: {message.Leaving.Reason}"));
                    continue;
                }
                if (message.KindCase == WorkerMessage.KindOneofCase.Leaving)
                {
                    why = $"leaving: {message.Leaving.Reason}";
                    kind = LeaveKind.Left;
                    break;
                }
                await HandleAsync(hello.WorkerId, worker, connection, message);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException || (e is RpcException r && r.StatusCode == StatusCode.Cancelled))
        {
            why = "connection lost";
        }
        finally
        {
            connection.Complete();
            if (connection.Export is { } export) await grains.GetGrain<IJobExportsGrain>(export.Job).WorkerLostAsync(hello.WorkerId, why);
            if (connection.Evaluation is { } evaluation) await grains.GetGrain<IEvaluationGrain>(evaluation.EvaluationId).WorkerLostAsync(hello.WorkerId, why);
            await worker.DisconnectedAsync(number, why, kind);
            grains.DeleteObjectReference<IWorkerControlObserver>(observer);
            try { await pump; } catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException) { }
        }
    }

    async Task HandleAsync(string workerId, IGpuWorkerGrain worker, WorkerConnection connection, WorkerMessage message)
    {
        switch (message.KindCase)
        {
            case WorkerMessage.KindOneofCase.Heartbeat:
                var h = message.Heartbeat;
                // The worker grain records a zombie's heartbeat with its job itself (it knows which job it was in).
                await Fenced(workerId, connection, null, h.Generation, "heartbeat", () => worker.HeartbeatAsync(h.Generation, new WorkerMetrics
                {
                    Step = h.Step, Loss = h.Loss, TokensPerSecond = h.TokensPerSecond, MemoryUsedBytes = h.MemoryUsedBytes,
                }));
                break;
            // After the Stop that completed the job, the other ranks' reports of the last step still belong to its generation.
            case WorkerMessage.KindOneofCase.Step when (connection.Current ?? connection.Last) is { } a:
                var s = message.Step;
                await Fenced(workerId, connection, a.JobId, s.Generation, "step", () => grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportStepAsync(s.Generation, new StepReport
                {
                    Rank = s.Rank, Step = s.Step, Loss = s.Loss, TokensPerSecond = s.TokensPerSecond, LearningRate = s.LearningRate,
                    SampleStart = s.SampleStart, SampleCount = s.SampleCount,
                    ExpertLoad = [.. s.ExpertLoad], ExpertLayers = [.. s.ExpertLayers], Experts = s.Experts, Resent = s.Resent,
                    AchievedFlops = s.AchievedFlops, Peak = s.Peak is { } p ? new DevicePeakInfo(p.Flops, p.Precision, p.Source, p.Description, p.Hardware) : null,
                    HasValidation = s.HasValidation, ValidationLoss = s.ValidationLoss, EvalResultsJson = s.EvalResultsJson,
                }));
                break;
            case WorkerMessage.KindOneofCase.Resumed when connection.Current is { } a:
                var r = message.Resumed;
                await Fenced(workerId, connection, a.JobId, r.Generation, "resumed", () => grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportResumedAsync(r.Generation, new ResumedReport
                {
                    Step = r.Step, Source = r.Source, SourceRank = r.SourceRank, RestoreSeconds = r.RestoreSeconds, StateBytes = r.StateBytes,
                }));
                break;
            case WorkerMessage.KindOneofCase.Checkpoint when message.Checkpoint.Error.Length > 0 && (connection.Current ?? connection.Last) is { } a:
                var failed = message.Checkpoint;
                await Fenced(workerId, connection, a.JobId, failed.Generation, "checkpoint", () =>
                    grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportCheckpointFailedAsync(failed.Generation, failed.Step, failed.Rank, failed.Error));
                break;
            case WorkerMessage.KindOneofCase.Checkpoint when (connection.Current ?? connection.Last) is { } a:
                var c = message.Checkpoint;
                // The report that completes the step makes the job grain hand it to the CheckpointCommitter.
                await Fenced(workerId, connection, a.JobId, c.Generation, "checkpoint", () =>
                    grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportCheckpointAsync(c.Generation, new CheckpointReport
                    {
                        Rank = c.Rank, Step = c.Step, File = c.File, SizeBytes = c.SizeBytes, Sha256 = c.Sha256, ManifestJson = c.ManifestJson,
                    }));
                break;
            case WorkerMessage.KindOneofCase.Guard when (connection.Current ?? connection.Last) is { } a:
                var g = message.Guard;
                await Fenced(workerId, connection, a.JobId, g.Generation, "guard", () => grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportGuardAsync(g.Generation, new GuardReport
                {
                    Step = g.Step, Action = g.Action, Reason = g.Reason, RestoredStep = g.RestoredStep, SamplesSkipped = g.SamplesSkipped,
                    LrScale = g.LrScale, Rollbacks = g.Rollbacks,
                }));
                break;
            case WorkerMessage.KindOneofCase.NcclUniqueId when connection.Current is { } a:
                var n = message.NcclUniqueId;
                await Fenced(workerId, connection, a.JobId, n.Generation, "nccl-unique-id", () =>
                    grains.GetGrain<ITrainingJobGrain>(a.JobId).ShareNcclUniqueIdAsync(n.Generation, a.Rank, n.Group, n.Id.ToByteArray(), n.Reason));
                break;
            // Not fenced: every rank of a broken ring reports, and the grain ignores all but the current generation's first.
            case WorkerMessage.KindOneofCase.CollectiveFailed when connection.Current is { } a:
                await grains.GetGrain<ITrainingJobGrain>(a.JobId).ReportCollectiveFailedAsync(message.CollectiveFailed.Generation, workerId, message.CollectiveFailed.Reason);
                break;
            case WorkerMessage.KindOneofCase.CollectiveFailed:
                break; // the worker already left that job
            // After the job completed (its Stop cleared Current): the model is written once the last step is trained.
            case WorkerMessage.KindOneofCase.ModelSaved when (connection.Current ?? connection.Last) is { } a:
                var m = message.ModelSaved;
                await worker.ModelSavedAsync(a.JobId, m.Step, m.Path);
                break;
            // Not fenced by generation: an export belongs to no generation; the job's exports grain matches it to the order.
            case WorkerMessage.KindOneofCase.ExportFinished when JobSpec.IsValidName(message.ExportFinished.JobId):
                var x = message.ExportFinished;
                connection.Export = null;
                await grains.GetGrain<IJobExportsGrain>(x.JobId).FinishedAsync(workerId, x.Step, x.Format,
                    x.Error.Length > 0 ? x.Error : null, NullIfEmpty(x.ManifestKey), x.Files, x.Bytes);
                break;
            case WorkerMessage.KindOneofCase.EvaluationFinished when message.EvaluationFinished.EvaluationId.StartsWith("eval-", StringComparison.Ordinal):
                var v = message.EvaluationFinished;
                connection.Evaluation = null;
                await grains.GetGrain<IEvaluationGrain>(v.EvaluationId).FinishedAsync(workerId, v.Rank, NullIfEmpty(v.ResultsJson), NullIfEmpty(v.Error));
                break;
            case WorkerMessage.KindOneofCase.Step or WorkerMessage.KindOneofCase.Checkpoint or WorkerMessage.KindOneofCase.Resumed or WorkerMessage.KindOneofCase.NcclUniqueId or WorkerMessage.KindOneofCase.Guard:
                connection.Send(Refusal($"worker '{workerId}' has no assignment; the report was refused"));
                break;
            default:
                connection.Send(Refusal($"unexpected {message.KindCase} after Hello"));
                break;
        }
    }

    /// <summary>
    /// Runs a grain call; a stale generation or a finished job is answered with Refused, and the stream stays open. A
    /// report from a generation the worker no longer belongs to (a zombie) is refused with rejoin and recorded with its job.
    /// </summary>
    async Task Fenced(string workerId, WorkerConnection connection, string? jobId, long generation, string what, Func<Task> call)
    {
        try { await call(); }
        catch (StaleGenerationException e)
        {
            // A job-level report is a zombie's when this stream was not moved on to a newer generation: the Coordinator
            // gave up on it (Stop) or never assigned it the job's current one. A healthy worker's report that crossed its
            // new Assignment is refused quietly.
            bool rejoin = e.Rejoin || (jobId is not null && generation > 0 && (connection.Current is null || connection.Current.Generation == generation));
            if (rejoin && jobId is not null) grains.GetGrain<ITrainingJobGrain>(jobId).WorkerFencedAsync(workerId, generation, what).Ignore();
            connection.Send(new CoordinatorMessage { Refused = new Refused { Reason = e.Message, Rejoin = rejoin, StaleGeneration = generation } });
        }
        catch (InvalidOperationException e) { connection.Send(Refusal(e.Message)); }
    }

    public override async Task<JobReply> SubmitJob(SubmitJobRequest request, ServerCallContext context)
    {
        string? presented = ClusterToken.FromAuthorization(context.RequestHeaders.GetValue("authorization"));
        if (!token.Matches(presented))
        {
            string reason = presented is null ? "missing" : "wrong";
            metrics.AuthRefused("grpc", reason);
            logger.LogWarning("Refused SubmitJob from {Peer}: {Reason} cluster token", context.Peer, reason);
            throw new RpcException(new Status(StatusCode.Unauthenticated, "cluster token missing or wrong"));
        }
        JobSpec? spec;
        try { spec = JsonSerializer.Deserialize<JobSpec>(request.JobSpecJson, JobSpecJson.Submitted); }
        catch (JsonException e) { throw new RpcException(new Status(StatusCode.InvalidArgument, $"job_spec_json: {JobSpecJson.Problem(e)}")); }
        if (spec is null) throw new RpcException(new Status(StatusCode.InvalidArgument, "job_spec_json: expected a JobSpec JSON object"));
        return await jobs.SubmitAsync(spec) switch
        {
            JobSubmission.Accepted a => Reply(a.Status),
            JobSubmission.Invalid i => throw new RpcException(new Status(StatusCode.InvalidArgument,
                "invalid job spec: " + string.Join("; ", i.Problems.Select(p => $"{p.Field}: {p.Message}")))),
            JobSubmission.Conflict c => throw new RpcException(new Status(StatusCode.AlreadyExists, c.Message)),
            _ => throw new InvalidOperationException("unknown submission outcome"),
        };
    }

    public override async Task<JobReply> GetJob(GetJobRequest request, ServerCallContext context) =>
        await jobs.GetAsync(request.JobId) is { } status
            ? Reply(status)
            : throw new RpcException(new Status(StatusCode.NotFound, $"no job '{Printable(request.JobId)}'"));

    static JobReply Reply(JobStatus s) => new()
    {
        JobId = s.JobId, State = s.State.ToString(), Generation = s.Generation, Step = s.Step,
        StatusJson = JsonSerializer.Serialize(s, JobSpecJson.Options),
    };

    static Task Refuse(IServerStreamWriter<CoordinatorMessage> responses, string reason, CancellationToken ct) =>
        responses.WriteAsync(Refusal(reason), ct);

    static CoordinatorMessage Refusal(string reason) => new() { Refused = new Refused { Reason = reason } };

    static string? NullIfEmpty(string s) => string.IsNullOrEmpty(s) ? null : s;

    /// <summary>A caller-supplied string fit for a log line: short, no control characters.</summary>
    static string Printable(string s) => new([.. s.Take(64).Select(ch => char.IsControl(ch) ? '?' : ch)]);
}
