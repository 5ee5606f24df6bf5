// One generation's training on this worker: the job's plan and data, the formation (RunFormation), the steps (StepLoop)
// and the end (RunEnd). Runs on a dedicated thread (ClusterWorker); see docs/worker.md for the map.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.ServiceDefaults;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Parallel;
using Assignment = DeepSeekCluster.Contracts.Control.Assignment;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

using TorchSharp;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// <paramref name="collectivePort"/>: where this worker's ring collective listens; <paramref name="pipelinePort"/>: where it
/// accepts the link from the pipeline stage before it (jobs with pp &gt; 1).
/// </summary>
public sealed class TrainingRun(Assignment assignment, WorkerSettings settings, int collectivePort, Action<WorkerMessage> send,
                                WorkerProgress progress, TextWriter log, TrainingMetrics? metrics = null, ReplicaHolder? replica = null, int pipelinePort = 0)
{
    readonly RunContext context = new(assignment, settings, send, log, metrics, new RunCancellation(), replica ?? new ReplicaHolder());
    readonly TaskCompletionSource<NcclUniqueId> ncclId = new(TaskCreationOptions.RunContinuationsAsynchronously);
    RunCancellation cancel => context.Cancel;
    ReplicaHolder holder => context.Holder;

    /// <summary>
    /// Stops at the step boundary: the step in flight finishes (cancellation is checked between steps). A collective that
    /// stays blocked past the grace (a peer is gone, or peers already began the next step) is aborted, so the run ends
    /// within about a second or two whatever the collective timeout. <paramref name="now"/>: abort at once.
    /// </summary>
    public void Cancel(bool now = false) => cancel.Cancel(now ? TimeSpan.Zero : AbortGrace);

    /// <summary>Long enough for the step in flight to finish on a healthy ring: twice the last step, at least a second.</summary>
    TimeSpan AbortGrace => TimeSpan.FromTicks(Math.Clamp(2 * context.LastStep.Ticks, TimeSpan.FromSeconds(1).Ticks, settings.CollectiveTimeout.Ticks));

    public void RequestCheckpoint(long step) => context.RequestCheckpoint(step);

    /// <summary>What the run's thread is doing now and for how long (a Stop that waits for the run logs it).</summary>
    public string Doing => context.DoingFor;

    public long Generation => assignment.Generation;
    public int Rank => assignment.Rank;

    /// <summary>The group's NCCL unique id as the Coordinator hands it on (ClusterWorker delivers it as it arrives).</summary>
    public void DeliverNcclUniqueId(NcclUniqueId id)
    {
        if (id.Generation == assignment.Generation && id.Group == assignment.PpStage) ncclId.TrySetResult(id);
    }

    /// <summary>Runs to the job's last step, a cancellation (new generation, stop), or a failure reported as Leaving(failed).</summary>
    public void Run()
    {
        try { RunCore(cancel.Boundary); }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested) { context.Log($"run cancelled at step {holder.State?.Step}"); }
        catch (CollectiveException e) when (cancel.IsCancellationRequested) { context.Log($"run cancelled at step {holder.State?.Step} ({e.Failure})"); }
        // A cancel that lands in a gRPC call (the manifest, the sample source, a checkpoint load) surfaces as
        // RpcException(Cancelled): the run was cancelled, it did not fail (reported as a failure, it failed the job).
        catch (Exception e) when (cancel.IsCancellationRequested && IsCancellation(e)) { context.Log($"run cancelled at step {holder.State?.Step} ({e.GetType().Name}: {e.Message})"); }
        // An aborted collective can surface as another error from the layers above it; the run was cancelled all the same.
        catch (Exception e) when (cancel.IsAborted) { context.Log($"run aborted at step {holder.State?.Step} ({e.GetType().Name}: {e.Message})"); }
        catch (CollectiveException e)
        {
            // A peer died, stalled or never connected. The coordinator re-forms when it notices a dead peer, but every member
            // may still be heartbeating (a ring that never formed): tell it, then wait for the next assignment.
            context.Log($"collective failed: {e.Message}");
            context.Send(new WorkerMessage { CollectiveFailed = new CollectiveFailed { Generation = assignment.Generation, Reason = $"rank {assignment.Rank}: {e.Message}" } });
        }
        catch (Exception e)
        {
            // A plan refused by the memory check fails on the user's numbers, which its message names: no stack trace.
            context.Log(e is PlanDoesNotFitException ? $"training refused: {e.Message}" : $"training failed: {e}");
            context.Send(new WorkerMessage { Leaving = new Leaving { Reason = $"rank {assignment.Rank}: {e.Message}", Failed = true, Generation = assignment.Generation } });
        }
        finally { cancel.Dispose(); }
    }

    static bool IsCancellation(Exception? e)
    {
        for (; e is not null; e = e.InnerException)
            if (e is OperationCanceledException || e is Grpc.Core.RpcException { StatusCode: Grpc.Core.StatusCode.Cancelled }) return true;
        return false;
    }

    void RunCore(CancellationToken ct)
    {
        var device = StandaloneRun.ResolveDevice(settings.Device);
        // Mutual TLS when Cluster__Tls__* are set (WorkerSettings checked the addresses are https:// then); the token always.
        using var dataChannel = ClusterChannel.For(settings.DataShards, settings.Tls, WorkerSettings.DataShardsKey, token: settings.Token);
        using var storeChannel = ClusterChannel.For(settings.Checkpoints, settings.Tls, WorkerSettings.CheckpointsKey, token: settings.Token);
        var data = new DataShards.DataShardsClient(dataChannel);

        // ---- The plan: the spec mapped onto the dataset ----
        var spec = JobSpecJson.Deserialize(assignment.JobSpecJson, $"the assignment of job {assignment.JobId}");
        var manifest = data.GetManifest(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var tokenizer = data.GetTokenizer(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var budget = settings.MemoryBudget(device);
        var (plan, found) = JobPlan.For(assignment, spec, manifest, tokenizer, cuda: device.type == DeviceType.CUDA)
            .WithMicroBatchFound(assignment, device, budget.Bytes);
        if (found is not null) context.Log($"microBatch unset: the batch-size finder chose {found} ({budget.Source})");
        // The rank's whole share of a step in one call: the trainer fetches its micro-batches of it in order.
        var share = ParallelLayout.ReplicaSamples(0, spec.GlobalBatch, assignment.DpRank, assignment.DpSize);
        using var source = RemoteSampleSource.For(manifest, data, spec.Dataset, (ulong)spec.Seed, spec.SeqLen, (long)spec.Steps * spec.GlobalBatch, ct,
                                                  readAhead: share.Count, stride: spec.GlobalBatch, abort: cancel.Abort);
        if (holder.State is { } previous && (previous.JobId != assignment.JobId || previous.Fingerprint != plan.Fingerprint))
        {
            context.Log($"dropping the live state of job {previous.JobId} (another job or spec)");
            holder.Drop();
        }

        // ---- Formation, the steps, the end ----
        context.Doing = "forming the generation";
        using var formed = RunFormation.Form(context, plan, source, device, ncclId.Task, storeChannel, tokenizer.TokenizerHash, collectivePort, pipelinePort, ct);
        using var validation = new RunValidation(data, plan);
        var evaluation = spec.EvalTasks.Length > 0 ? new CheckpointEvaluation(context, plan, tokenizer, formed.Ring, device) : null;
        var loop = new StepLoop(context, plan, formed, source, progress, RunEnd.Validates(assignment, plan) ? validation : null, evaluation);
        loop.Run(ct);
        if (assignment.CheckpointOnly) return; // the job was preempted: its run ends when the workers are released
        RunEnd.Finish(context, plan, formed, validation, loop.LastValidation, device, tokenizer, ct);
        context.Doing = "closing the generation (collectives, trainer, data source, channels)";
    }
}
