// A generation's formation on this worker: the ring of its data-parallel group, the pipeline links (pp > 1), NCCL, the
// gradient reducer, where to resume and the restored live state; it hands back the ITrainer the step loop drives.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Perf;
using DeepSeekCluster.Training.Pipeline;
using static TorchSharp.torch;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// What a formed generation holds until its run ends, disposed in reverse: the collectives, their abort guards, the
/// reducer and the trainer. A stage of a pipeline (pp &gt; 1) is the one branch: its ring spans only its stage's
/// replicas, it links to the stages before and after it, all stages agree on one resume step, and it trains with a
/// <see cref="PipelineTrainer"/>; otherwise a <see cref="Trainer"/> over the whole model.
/// </summary>
sealed class RunFormation : IDisposable
{
    /// <summary>The peak per device, looked up once per process (a re-formation should not pay for it again).</summary>
    static readonly System.Collections.Concurrent.ConcurrentDictionary<string, HardwarePeak> Peaks = new();

    readonly Stack<IDisposable> owned = new();

    public required ITrainer Trainer { get; init; }
    public required ReplicaState Live { get; init; }
    public required ParallelLayout Layout { get; init; }
    public required ShardingPlan Sharding { get; init; }
    public required GrpcCheckpointStore Store { get; init; }
    /// <summary>The dataset's tokenizer hash: checkpoints carry it, and a load checks it.</summary>
    public required string TokenizerHash { get; init; }
    /// <summary>This stage's tcp ring (all ranks when pp = 1): the small exchanges between steps use it.</summary>
    public required ICollective Ring { get; init; }

    T Own<T>(T disposable) where T : IDisposable { owned.Push(disposable); return disposable; }

    public void Dispose()
    {
        while (owned.TryPop(out var d)) d.Dispose();
    }

    /// <summary>
    /// Forms this worker's part of the generation. A cancel ends any wait (rendezvous, links, the NCCL id) at once; a
    /// dead or stalled peer fails it within the collective timeout (CollectiveException, the Coordinator re-forms).
    /// </summary>
    public static RunFormation Form(RunContext run, JobPlan plan, ISampleSource source, Device device, Task<NcclUniqueId> ncclId,
                                    Grpc.Net.Client.GrpcChannel storeChannel, string tokenizerHash, int collectivePort, int pipelinePort,
                                    CancellationToken ct)
    {
        var a = run.Assignment;
        int stage = a.PpStage, replica = a.DpRank, dp = a.DpSize, pp = a.PpSize;
        bool pipeline = pp > 1;
        var layout = ParallelLayout.Even(dp, pp, plan.Config.NumHiddenLayers)
            .WithShards(plan.Spec.Parallel.Ep, plan.Spec.Parallel.Zero, plan.Config.NRoutedExperts);
        if (a.Rank != layout.Rank(stage, replica) || a.World != layout.WorldSize)
            throw new InvalidDataException($"the assignment's rank {a.Rank} of {a.World} is not stage {stage}, replica {replica} of dp {dp} x pp {pp} (ranks are stage-major: rank = stage·dp + replica)");
        // Refused before anything is allocated or connected: every rank predicts the same and fails the job, naming the bytes.
        var (budget, budgetSource) = run.Settings.MemoryBudget(device);
        var memoryInputs = MemoryInputsOf(plan, dp, device);
        var largest = MemoryPlanner.CheckFits(plan.Config, layout, memoryInputs, budget, budgetSource);
        // This rank's own prediction (the check is against the largest rank's, named when it is another).
        var memory = largest.Rank == a.Rank ? largest : MemoryPlanner.Predict(plan.Config, layout, a.Rank, memoryInputs);
        run.Log($"memory plan ({plan.Options.Precision}, zero {layout.Zero}): {memory} of {RankMemory.Gib(budget)} ({budgetSource}); activations estimated" +
                (largest.Total > memory.Total ? $"; the largest rank, {largest.Rank}: {RankMemory.Gib(largest.Total)}" : ""));
        var formed = new List<IDisposable>();
        T Keep<T>(T d) where T : IDisposable { formed.Add(d); return d; }
        try
        {
            // ---- Collectives: this stage's ring (all ranks when pp = 1), then the stage links ----
            var ringPeers = Enumerable.Range(0, dp).Select(r => run.EndpointOf(a.Peers, layout.Rank(stage, r), "collective")).ToList();
            var ring = Keep(RunCancellation.ConnectRing(
                () => new TcpRendezvous(pipeline ? $"{a.JobId}/stage-{stage}" : a.JobId, a.Generation, a.LinkKey.ToByteArray(), replica, dp,
                                        new System.Net.IPEndPoint(System.Net.IPAddress.Any, collectivePort)),
                ringPeers, new TcpCollectiveOptions { Timeout = run.Settings.CollectiveTimeout }, ct));
            Keep(run.Cancel.Guard(ring));
            var links = pipeline ? Keep(StageLinks.Connect(run, layout, pipelinePort, ct)) : null;
            if (links is not null) Keep(run.Cancel.Abort.Register(links.Dispose));
            // The whole model's ring always all-reduces, even alone (as before the pipeline existed); a stage without
            // another replica has nothing to reduce.
            bool reduces = !pipeline || dp > 1;
            var nccl = reduces ? NcclFor(run, ring, device, ncclId, ct) : null;
            if (nccl is not null) { Keep(nccl); Keep(run.Cancel.Guard(nccl)); }
            var reducer = reduces ? new BucketedGradientReducer((ICollective?)nccl ?? ring) : null;
            var computeType = MemoryPlanner.ComputeType(plan.Options.Precision); // the dtype the planner predicted for: one mapping
            var peak = Peaks.GetOrAdd($"{device}/{computeType}", _ => HardwarePeak.For(device, computeType, PeakSettings.FromEnvironment(), run.Log));
            var store = new GrpcCheckpointStore(new CheckpointStoreClient(storeChannel), run.Settings.Checkpoints.ToString(), a.JobId,
                                                Path.Combine(run.Settings.OutputDir, "staging", run.WorkerId))
            {
                Exports = new GrpcExportStore(new Contracts.Checkpoints.ExportStore.ExportStoreClient(storeChannel), run.Settings.Checkpoints.ToString()),
            };
            run.Metrics?.CheckpointRunStarted(a.JobId, run.WorkerId);

            // ---- Where to resume, and the live state restored there ----
            long restoreStart = System.Diagnostics.Stopwatch.GetTimestamp();
            // startFrom (a PBT exploit): the first generation loads the other job's committed checkpoint; later ones this job's.
            var resumeStore = plan.Spec.StartFrom is { } from && a.ResumeStep == from.Step
                ? new GrpcCheckpointStore(new CheckpointStoreClient(storeChannel), run.Settings.Checkpoints.ToString(), from.Job,
                                          Path.Combine(run.Settings.OutputDir, "staging", run.WorkerId))
                : store;
            var resume = new Resumption(run, plan, device, layout, resumeStore, tokenizerHash, ct);
            var (resumePlan, stateBytes) = resume.Restore(ring, links);
            var live = run.Holder.State!;
            // Before the trainer: under ZeRO-3 it empties the parameters, whose whole shapes the catalog names.
            var catalog = live.Stage?.CheckpointCatalog ?? CheckpointTensors.Catalog(live.Model, live.Optimizer);
            ITrainer trainer = pipeline
                ? Keep(new PipelineTrainer(live.Stage!, source, plan.Options, device, peak, links!, replica, dp, reducer, live.Optimizer))
                : Keep(new Trainer(live.Model, source, null, plan.Options, device, peak, replica, dp, reducer, live.Optimizer));
            trainer.ResumeAt(live.Step, live.Optimizer.StepCount);
            resume.Report(resumePlan, live.Step, ReplicaSync.Seconds(restoreStart), stateBytes);
            run.Log($"generation {a.Generation}: rank {a.Rank} of {a.World}" +
                    (pipeline ? $" = stage {stage} (layers {live.Stage!.Layers.FirstLayer}..{live.Stage.Layers.End - 1}) of replica {replica}, dp {dp} x pp {pp}" : "") +
                    $", {plan.Config.ParameterCount() / 1e6:F2} M parameters, global batch {plan.Options.GlobalBatch} = {dp} x {plan.Options.MicroBatch} x " +
                    $"{plan.Options.Accumulation(dp)} micro-batches, from step {live.Step} ({resumePlan.Source})" +
                    (trainer is Trainer { OverlapsReduction: true } ? ", gradient all-reduce overlapped with the backward" : ""));
            var formation = new RunFormation { Trainer = trainer, Live = live, Layout = layout, Sharding = new ShardingPlan(layout, catalog), Store = store, TokenizerHash = tokenizerHash, Ring = ring };
            foreach (var d in formed) formation.Own(d);
            return formation;
        }
        catch
        {
            for (int i = formed.Count - 1; i >= 0; i--) formed[i].Dispose();
            throw;
        }
    }

    /// <summary>What besides the layout decides a rank's memory: the job's precision, recompute and micro-batches.</summary>
    public static MemoryInputs MemoryInputsOf(JobPlan plan, int dp, Device device) =>
        new(plan.Options.Precision, plan.Spec.ActivationCheckpointing, plan.Options.MicroBatch, plan.Options.SeqLen,
            plan.Options.Accumulation(dp), plan.Options.PipelineSchedule, plan.Spec.Parallel.Redundancy, Device: device.type);

    /// <summary>
    /// Where the gradients are all-reduced: on CUDA, an NCCL communicator of the ring's ranks; on CPU, null: the tcp ring
    /// itself, which also stays for the small exchanges (held steps, a live state for a rank behind). The ring's first
    /// rank makes the communicator's unique id and sends it up; the Coordinator hands it to the others (or the reason
    /// it could not, so they fail at once instead of waiting out the timeout).
    /// </summary>
    static NcclCollective? NcclFor(RunContext run, TcpCollective ring, Device device, Task<NcclUniqueId> delivered, CancellationToken ct)
    {
        if (Collective.BackendFor(device) != "nccl") return null;
        long generation = run.Assignment.Generation;
        int group = run.Assignment.PpStage;
        var timeout = run.Settings.CollectiveTimeout;
        byte[] id;
        if (ring.Rank == 0)
        {
            try { id = NcclCollective.CreateUniqueId(); }
            catch (CollectiveException e)
            {
                run.Send(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = generation, Group = group, Reason = e.Message } });
                throw;
            }
            run.Send(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = generation, Group = group, Id = Google.Protobuf.ByteString.CopyFrom(id) } });
        }
        else
        {
            if (!TrainingThread.TryWait(delivered, timeout, ct, out var shared))
                throw new CollectiveException(CollectiveFailure.PeerStalled,
                    $"the NCCL unique id of generation {generation} (group {group}) did not come from the coordinator within {timeout.TotalSeconds:0.#} s");
            if (shared.Id.IsEmpty)
                throw new CollectiveException(CollectiveFailure.Unavailable, $"the first rank of group {group} could not make the NCCL unique id of generation {generation}: {shared.Reason}");
            id = shared.Id.ToByteArray();
        }
        var nccl = NcclCollective.Create(id, ring.Rank, ring.WorldSize, generation, device, timeout);
        run.Log($"NCCL {NcclCollective.Inspect().Version}: a communicator of {ring.WorldSize} rank(s) on {device} all-reduces the gradients");
        return nccl;
    }
}
