// One generation's training on this worker: model, data from DataShardService, tcp/nccl collectives, checkpoints to CheckpointStore.
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using Assignment = DeepSeekCluster.Contracts.Control.Assignment;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Perf;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tokenization;
using DeepSeekCluster.ServiceDefaults;
using TorchSharp;
using static TorchSharp.torch;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>Holds the worker's live state between runs (see <see cref="ReplicaState"/>); runs use it one at a time.</summary>
public sealed class ReplicaHolder : IDisposable
{
    public ReplicaState? State { get; set; }

    public void Drop()
    {
        State?.Dispose();
        State = null;
    }

    public void Dispose() => Drop();
}

/// <summary>
/// <paramref name="collectivePort"/>: where this worker's ring collective listens; <paramref name="pipelinePort"/>: where it
/// accepts the link from the pipeline stage before it (jobs with pp &gt; 1).
/// </summary>
public sealed class TrainingRun(Assignment assignment, WorkerSettings settings, int collectivePort, Action<WorkerMessage> send,
                                WorkerProgress progress, TextWriter log, TrainingMetrics? metrics = null, ReplicaHolder? replica = null, int pipelinePort = 0)
{
    /// <summary>The matmul peak per device, measured once per process (a re-formation should not pay for it again).</summary>
    static readonly System.Collections.Concurrent.ConcurrentDictionary<string, double> Peaks = new();

    static readonly JsonSerializerOptions SpecJson = new(JsonSerializerDefaults.Web)
    {
        Converters = { new System.Text.Json.Serialization.JsonStringEnumConverter() },
    };

    readonly RunCancellation cancel = new();
    readonly TaskCompletionSource<NcclUniqueId> ncclId = new(TaskCreationOptions.RunContinuationsAsynchronously);
    readonly ReplicaHolder holder = replica ?? new ReplicaHolder();
    readonly System.Collections.Concurrent.ConcurrentDictionary<long, string> manifests = new();
    long checkpointRequested = -1;
    long lastStepTicks = TimeSpan.FromSeconds(1).Ticks;

    /// <summary>
    /// Stops at the step boundary: the step in flight finishes (cancellation is checked between steps). A collective that
    /// stays blocked past the grace (a peer is gone, or peers already began the next step) is aborted, so the run ends
    /// within about a second or two whatever the collective timeout. <paramref name="now"/>: abort at once.
    /// </summary>
    public void Cancel(bool now = false) => cancel.Cancel(now ? TimeSpan.Zero : AbortGrace);

    /// <summary>Long enough for the step in flight to finish on a healthy ring: twice the last step, at least a second.</summary>
    TimeSpan AbortGrace => TimeSpan.FromTicks(Math.Clamp(2 * Interlocked.Read(ref lastStepTicks), TimeSpan.FromSeconds(1).Ticks, settings.CollectiveTimeout.Ticks));
    public void RequestCheckpoint(long step) => Interlocked.Exchange(ref checkpointRequested, step);

    /// <summary>Runs to the job's last step, a cancellation (new generation, stop), or a failure reported as Leaving(failed).</summary>
    public void Run()
    {
        try { RunCore(cancel.Boundary); }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested) { Log($"run cancelled at step {holder.State?.Step}"); }
        catch (CollectiveException e) when (cancel.IsCancellationRequested) { Log($"run cancelled at step {holder.State?.Step} ({e.Failure})"); }
        // A cancel that lands in a gRPC call (the manifest, the sample source, a checkpoint load) surfaces as
        // RpcException(Cancelled): the run was cancelled, it did not fail (reported as a failure, it failed the job).
        catch (Exception e) when (cancel.IsCancellationRequested && IsCancellation(e)) { Log($"run cancelled at step {holder.State?.Step} ({e.GetType().Name}: {e.Message})"); }
        // An aborted collective can surface as another error from the layers above it; the run was cancelled all the same.
        catch (Exception e) when (cancel.IsAborted) { Log($"run aborted at step {holder.State?.Step} ({e.GetType().Name}: {e.Message})"); }
        catch (CollectiveException e)
        {
            // A peer died, stalled or never connected. The coordinator re-forms when it notices a dead peer, but every member
            // may still be heartbeating (a ring that never formed): tell it, then wait for the next assignment.
            Log($"collective failed: {e.Message}");
            send(new WorkerMessage { CollectiveFailed = new CollectiveFailed { Generation = assignment.Generation, Reason = $"rank {assignment.Rank}: {e.Message}" } });
        }
        catch (Exception e)
        {
            Log($"training failed: {e}");
            send(new WorkerMessage { Leaving = new Leaving { Reason = $"rank {assignment.Rank}: {e.Message}", Failed = true, Generation = assignment.Generation } });
        }
        finally { cancel.Dispose(); }
    }

    static bool IsCancellation(Exception? e)
    {
        for (; e is not null; e = e.InnerException)
            if (e is OperationCanceledException || e is Grpc.Core.RpcException { StatusCode: Grpc.Core.StatusCode.Cancelled }) return true;
        return false;
    }

    /// <summary>The longest wait between two saves of a final checkpoint that the store did not take.</summary>
    static readonly TimeSpan FinalCheckpointRetryCap = TimeSpan.FromSeconds(30);

    void RunCore(CancellationToken ct)
    {
        var spec = JsonSerializer.Deserialize<JobSpec>(assignment.JobSpecJson, SpecJson)
                   ?? throw new InvalidDataException("the assignment carries no job spec");
        var device = StandaloneRun.ResolveDevice(settings.Device);
        // Mutual TLS when Cluster__Tls__* are set (WorkerSettings checked the addresses are https:// then).
        using var dataChannel = ClusterChannel.For(settings.DataShards, settings.Tls, WorkerSettings.DataShardsKey);
        using var storeChannel = ClusterChannel.For(settings.Checkpoints, settings.Tls, WorkerSettings.CheckpointsKey);
        var data = new DataShards.DataShardsClient(dataChannel);

        // ---- Data and model ----
        var manifest = data.GetManifest(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var tokenizerReply = data.GetTokenizer(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var baseConfig = spec.ModelConfigJson is { Length: > 0 } json ? DeepSeekConfig.FromJson(json, "job spec modelConfigJson") : DeepSeekConfig.Preset(spec.ModelPreset!);
        var config = (baseConfig with { VocabSize = manifest.VocabSize, EosTokenId = tokenizerReply.EotTokenId }).Validated();
        var options = new TrainingOptions
        {
            SeqLen = spec.SeqLen, GlobalBatch = spec.GlobalBatch, MicroBatch = spec.MicroBatch, Steps = spec.Steps,
            Lr = spec.Schedule.PeakLr, Schedule = spec.Schedule.Kind, WarmupSteps = spec.Schedule.WarmupSteps,
            MinLrRatio = spec.Schedule.PeakLr > 0 ? spec.Schedule.MinLr / spec.Schedule.PeakLr : 0.1,
            Seed = spec.Seed, CheckpointEvery = spec.CheckpointInterval, EvalEvery = 0,
            PipelineSchedule = spec.Parallel.Schedule,
        }.Validated(assignment.DpSize);
        // The rank's whole share of a step in one call: the trainer fetches its micro-batches of it in order.
        using var source = RemoteSampleSource.OpenAsync(data, spec.Dataset, (ulong)spec.Seed, spec.SeqLen, (long)spec.Steps * spec.GlobalBatch, ct,
                                                        readAhead: spec.GlobalBatch / assignment.DpSize, stride: spec.GlobalBatch)
            .GetAwaiter().GetResult();
        string fingerprint = ReplicaState.FingerprintOf(assignment.JobId, assignment.JobSpecJson, manifest.VocabSize, tokenizerReply.TokenizerHash)
                             + (assignment.PpSize > 1 ? $"/stage {assignment.PpStage}" : ""); // a stage's state is no other stage's
        if (holder.State is { } previous && (previous.JobId != assignment.JobId || previous.Fingerprint != fingerprint))
        {
            Log($"dropping the live state of job {previous.JobId} (another job or spec)");
            holder.Drop();
        }

        if (assignment.PpSize > 1)
        {
            RunStage(spec, config, options, device, data, source, tokenizerReply, storeChannel, fingerprint, ct);
            return;
        }

        // ---- Collectives: the ring of this generation (a cancel ends the rendezvous at once) ----
        var peers = Enumerable.Range(0, assignment.World).Select(r => EndpointOf(assignment.Peers, r, "collective")).ToList();
        using var collective = RunCancellation.ConnectRing(
            () => new TcpRendezvous(assignment.JobId, assignment.Generation, assignment.Rank, assignment.World,
                                    new System.Net.IPEndPoint(System.Net.IPAddress.Any, collectivePort)),
            peers, new TcpCollectiveOptions { Timeout = settings.CollectiveTimeout }, ct);
        using var aborting = cancel.Guard(collective);
        using var nccl = NcclFor(collective, device, ct);
        using var abortingNccl = nccl is null ? default : cancel.Guard(nccl);
        using var reducer = new BucketedGradientReducer((ICollective?)nccl ?? collective);
        var (peak, store) = PeakAndStore(device, storeChannel);

        // ---- Where to resume: a live replica, the committed checkpoint, or the start ----
        long restoreStart = System.Diagnostics.Stopwatch.GetTimestamp();
        var held = ReplicaSync.ExchangeHeldSteps(collective, holder.State is { } h ? new HeldState(h.Step, h.Lineage) : new HeldState(-1, 0));
        var plan = ReplicaSync.Decide(held, assignment.ResumeStep);
        long stateBytes = Restore(plan, held, collective, restoreStart, "", $"rank {plan.SourceRank}",
            () => NewState(config, options, spec.Seed, device, fingerprint),
            (state, loadStart) =>
            {
                var loaded = ShardedCheckpointLoader.LoadReplicaAsync(store, plan.Step, state.Model, state.Optimizer, tokenizerReply.TokenizerHash, ct)
                    .GetAwaiter().GetResult();
                state.Optimizer.StepCount = loaded.OptimizerSteps;
                state.Step = loaded.Step;
                // A replica reads every file of the checkpoint (each rank's shard).
                metrics?.CheckpointLoaded(assignment.JobId, settings.WorkerId, System.Diagnostics.Stopwatch.GetElapsedTime(loadStart), loaded.Files.Sum(f => f.Size));
                return $"resumed from committed step {loaded.Step} (generation {loaded.Generation}, {loaded.ConsumedSamples} samples consumed)";
            });
        var live = holder.State!;
        var model = live.Model;
        using var trainer = new Trainer(model, source, null, options, device, peak, assignment.DpRank, assignment.DpSize, reducer, live.Optimizer);
        trainer.ResumeAt(live.Step, live.Optimizer.StepCount);
        double restoreSeconds = ReplicaSync.Seconds(restoreStart);
        ReportResumed(plan, live.Step, restoreSeconds, stateBytes);
        Log($"generation {assignment.Generation}: rank {assignment.Rank} of {assignment.World}, {config.ParameterCount() / 1e6:F2} M parameters, " +
            $"global batch {options.GlobalBatch} = {assignment.DpSize} x {options.MicroBatch} x {options.Accumulation(assignment.DpSize)} accumulation, " +
            $"from step {live.Step} ({plan.Source})");

        // ---- Checkpoints and the loop ----
        var layout = ParallelLayout.Even(assignment.DpSize, 1, config.NumHiddenLayers);
        var sharding = new ShardingPlan(layout, CheckpointTensors.Catalog(CheckpointTensors.Collect(model, trainer.Optimizer)));
        TrainToTheEnd(new StepLoop(trainer.TrainStep, () => trainer.Step, () => trainer.ConsumedSamples, trainer.Optimizer,
                                   () => CheckpointTensors.Collect(model, trainer.Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value),
                                   a => trainer.BeforeOptimizerUpdate = a),
                      sharding, options, config, live, store, tokenizerReply.TokenizerHash, ct);

        // ---- The end: rank 0 evaluates, samples and writes the model folder (not cancelled by the job's Stop) ----
        if (assignment.Rank == 0) Finish(spec, options, device, data, tokenizerReply, model, validation => trainer.EvaluateOn(validation, 4));
    }

    /// <summary>Validation loss, a sample and the Hugging Face folder of the trained <paramref name="model"/> (rank 0, at the end).</summary>
    void Finish(JobSpec spec, TrainingOptions options, Device device, DataShards.DataShardsClient data, GetTokenizerReply tokenizerReply,
                DeepSeekForCausalLM model, Func<ISampleSource, double> evaluate)
    {
        var ct = CancellationToken.None;
        var tokenizer = BpeTokenizer.FromJson(tokenizerReply.TokenizerJson, $"dataset {spec.Dataset}");
        var validation = RemoteSampleSource.OpenAsync(data, spec.Dataset, (ulong)spec.Seed, spec.SeqLen, options.MicroBatch * 4L, ct, "validation")
            .GetAwaiter().GetResult();
        double val = evaluate(validation);
        metrics?.ValidationLoss(assignment.JobId, settings.WorkerId, val);
        Log($"validation loss {val:F4} nats/token, perplexity {Math.Exp(val):F1}");
        var prompt = tokenizer.Encode("In the beginning");
        var sample = TextGenerator.Generate(model, prompt, new SamplingOptions
        {
            MaxNewTokens = 40, Temperature = 0.8, TopP = 0.95, Seed = spec.Seed, EosTokenId = tokenizer.EosTokenId,
        }, device);
        Log($"sample: In the beginning{tokenizer.Decode(sample).ReplaceLineEndings(" ")}");
        var dir = Path.Combine(settings.OutputDir, assignment.JobId, "model");
        HfModelFolder.Save(dir, model, tokenizer);
        Log($"model saved to {Path.GetFullPath(dir)}");
        send(new WorkerMessage { ModelSaved = new ModelSaved { Generation = assignment.Generation, Step = spec.Steps, Path = Path.GetFullPath(dir) } });
    }

    /// <summary>What the step loop needs of a trainer: the single-process <see cref="Trainer"/> (pp = 1) or one stage's <see cref="PipelineTrainer"/>.</summary>
    sealed record StepLoop(Func<StepMetrics> TrainStep, Func<long> Step, Func<long> ConsumedSamples, AdamW Optimizer,
                           Func<IReadOnlyDictionary<string, Tensor>> CheckpointTensors, Action<Action> SetBeforeUpdate);

    /// <summary>
    /// The steps to the job's last, with checkpoints (this rank's file of <paramref name="sharding"/>; rank 0 also writes the
    /// manifest) and step reports, then the final checkpoint saved until the store takes it or the run is cancelled.
    /// </summary>
    void TrainToTheEnd(StepLoop trainer, ShardingPlan sharding, TrainingOptions options, DeepSeekConfig config, ReplicaState live,
                       GrpcCheckpointStore store, string tokenizerHash, CancellationToken ct)
    {
        int finalStored = 0;
        var saver = new AsyncCheckpointSaver(store, sharding, assignment.Rank, (outcome, token) =>
        {
            if (outcome.File is { } f)
            {
                if (outcome.Step == options.Steps) Volatile.Write(ref finalStored, 1);
                metrics?.CheckpointSaved(assignment.JobId, settings.WorkerId, outcome.Duration, f.Size);
                send(new WorkerMessage
                {
                    Checkpoint = new CheckpointReport
                    {
                        Generation = assignment.Generation, Step = outcome.Step, Rank = assignment.Rank, File = f.Name,
                        SizeBytes = f.Size, Sha256 = f.Sha256,
                        ManifestJson = manifests.TryRemove(outcome.Step, out var mj) ? mj : "",
                    },
                });
            }
            else
            {
                Log($"checkpoint of step {outcome.Step} failed: {outcome.Error?.Message}");
                manifests.TryRemove(outcome.Step, out _);
                if (outcome.Error is OperationCanceledException) return Task.CompletedTask; // the run is ending: nothing to tell
                NotStored(outcome.Step, $"could not store its file: {outcome.Error?.Message}");
            }
            return Task.CompletedTask;
        });

        // A checkpoint that will not commit from this generation is a job event naming the rank and why.
        void NotStored(long step, string why) =>
            send(new WorkerMessage { Checkpoint = new CheckpointReport { Generation = assignment.Generation, Step = step, Rank = assignment.Rank, Error = why } });
        trainer.SetBeforeUpdate(() =>
        {
            if (saver.WaitForSnapshot() is not null) metrics?.CheckpointSnapshot(assignment.JobId, settings.WorkerId, saver.LastStall);
        });
        // Whatever ends this generation, the live state is not touched again (a re-formation's broadcast) while a copy reads it.
        using var snapshotSettled = saver.SnapshotScope();
        // The host copies every save refills, allocated and faulted in beside the first steps rather than inside the
        // first save's step (the worker would hold them from that save on anyway).
        _ = saver.Prepare(trainer.CheckpointTensors());

        void SaveCheckpoint(long step)
        {
            var tensors = trainer.CheckpointTensors();
            if (assignment.Rank == 0)
                manifests[step] = GrpcCheckpointStore.ManifestJsonForReport(assignment.JobId, sharding,
                    new CheckpointPosition(trainer.Step(), assignment.Generation, trainer.ConsumedSamples(), trainer.Optimizer.StepCount),
                    config.ToJson(), tokenizerHash);
            // The copy runs beside the next step's forward and backward and the trainer waits for it before the update
            // (BeforeOptimizerUpdate); after the last step nothing follows to overlap, so the copy is taken here.
            bool last = step >= options.Steps;
            var request = last ? saver.Save(step, tensors) : saver.BeginSave(step, tensors);
            if (request.Started && last) metrics?.CheckpointSnapshot(assignment.JobId, settings.WorkerId, request.Stall);
            if (request.PreviousFailure is { } failure) Log($"an earlier checkpoint failed: {failure.Message}");
            if (request.Started) return;
            // Not started: the previous save is still uploading (a failed copy comes back through the saver's callback).
            if (last)
            {
                saver.WaitAsync().GetAwaiter().GetResult();
                var final = saver.Save(step, tensors); // the final state must be saved even if the previous save was still running
                if (final.Started) metrics?.CheckpointSnapshot(assignment.JobId, settings.WorkerId, final.Stall);
            }
            else
            {
                manifests.TryRemove(step, out _);
                NotStored(step, "skipped its save: the previous one was still uploading");
            }
        }

        // A generation that resumes at the last step trains nothing: the previous one finished the run, but its reports
        // crossed the re-formation and were refused, so its final checkpoint can never commit. This generation saves it.
        if (live.Step >= options.Steps && options.Steps > 0) SaveCheckpoint(live.Step);

        // ---- The loop ----
        progress.Generation = assignment.Generation;
        int perReplica = options.GlobalBatch / assignment.DpSize;
        long? deviceBytes = null;
        while (trainer.Step() < options.Steps)
        {
            ct.ThrowIfCancellationRequested();
            long stepStart = System.Diagnostics.Stopwatch.GetTimestamp();
            var m = trainer.TrainStep();
            live.Step = trainer.Step(); // the optimizer update is done: the live state is consistent at this step
            Interlocked.Exchange(ref lastStepTicks, System.Diagnostics.Stopwatch.GetElapsedTime(stepStart).Ticks);
            progress.Step = m.Step; progress.Loss = m.Loss; progress.TokensPerSecond = m.TokensPerSecond;
            // A replica's tokens pass through each of its stages: stage 0 alone counts them, so sums over workers stay the job's.
            bool countsTokens = assignment.PpStage == 0;
            metrics?.Record(assignment.JobId, settings.WorkerId, countsTokens ? m : m with { TokensPerSecond = 0 },
                            countsTokens ? (long)options.GlobalBatch / assignment.DpSize * options.SeqLen : 0);
            // The resident tensors are all allocated after the first step (gradients, optimizer moments) and keep their sizes.
            if (metrics is not null)
                metrics.DeviceMemory(assignment.JobId, settings.WorkerId,
                    deviceBytes ??= TrainingMetrics.TrainingStateBytes(live.Tensors().Select(kv => kv.Value), live.Model.parameters()));
            send(new WorkerMessage
            {
                Step = new StepReport
                {
                    Generation = assignment.Generation, Rank = assignment.Rank, Step = m.Step, Loss = m.Loss,
                    TokensPerSecond = m.TokensPerSecond * assignment.DpSize, LearningRate = m.LearningRate,
                    // Every stage of a replica trains on its slice: stage 0 alone reports it, so the ledger counts it once.
                    SampleStart = assignment.PpStage == 0 ? (m.Step - 1) * options.GlobalBatch + (long)assignment.DpRank * perReplica : 0,
                    SampleCount = assignment.PpStage == 0 ? perReplica : 0,
                    ExpertLoad = { assignment.Rank == 0 ? ExpertFractions(m) : [] },
                    ExpertLayers = { assignment.Rank == 0 && m.ExpertLoad.Count > 0 ? ExpertLayers(config, m.ExpertLoad.Count) : [] },
                    Experts = assignment.Rank == 0 && m.ExpertLoad.Count > 0 ? m.ExpertLoad[0].Length : 0,
                },
            });
            if (assignment.Rank == 0 && (m.Step % 10 == 0 || m.Step == options.Steps || m.Step == 1))
                Log(ConsoleProgress.Format(m, options.Steps, assignment.World, TimeSpan.Zero).Split(" | ETA")[0]);
            bool due = options.CheckpointEvery > 0 && m.Step % options.CheckpointEvery == 0 || m.Step == options.Steps
                       || Interlocked.Exchange(ref checkpointRequested, -1) == m.Step;
            if (due) SaveCheckpoint(m.Step);
        }
        var lastFailure = saver.WaitAsync().GetAwaiter().GetResult();
        if (lastFailure is not null) Log($"the last checkpoint failed: {lastFailure.Message}");
        // The job completes when its final checkpoint commits, so a final shard the store could not take (storage down
        // past the upload's own retries) is saved again from the live state until it is stored, or until the run is
        // cancelled (Stop, or a re-formation whose generation saves it instead).
        for (var delay = TimeSpan.FromSeconds(2); trainer.Step() >= options.Steps && options.Steps > 0 && Volatile.Read(ref finalStored) == 0;
             delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, FinalCheckpointRetryCap.Ticks)))
        {
            Log($"the final checkpoint (step {options.Steps}) is not stored yet; saving it again in {delay.TotalSeconds:0} s");
            if (ct.WaitHandle.WaitOne(delay)) break;
            SaveCheckpoint(options.Steps);
            if (saver.WaitAsync().GetAwaiter().GetResult() is { } failure) Log($"the final checkpoint failed again: {failure.Message}");
        }
        saver.DisposeAsync().AsTask().GetAwaiter().GetResult();

    }

    // ---- Pipeline stages (pp > 1) ----

    /// <summary>
    /// This worker trains stage PpStage of replica DpRank: its dp group (the ranks of its stage) forms the ring collective,
    /// and links go to the same replica's stages before and after it (their listeners are the assignment's stage peers).
    /// Every stage resumes at one step of one history, or all load the committed checkpoint. A dead or stalled neighbour
    /// fails a link within the collective timeout (CollectiveFailed, the Coordinator re-forms), and a cancelled run aborts
    /// the links with the ring.
    /// </summary>
    void RunStage(JobSpec spec, DeepSeekConfig config, TrainingOptions options, Device device, DataShards.DataShardsClient data, ISampleSource source,
                  GetTokenizerReply tokenizerReply, Grpc.Net.Client.GrpcChannel storeChannel, string fingerprint, CancellationToken ct)
    {
        int stage = assignment.PpStage, replica = assignment.DpRank, dp = assignment.DpSize, pp = assignment.PpSize;
        var layout = ParallelLayout.Even(dp, pp, config.NumHiddenLayers);
        if (assignment.Rank != layout.Rank(stage, replica) || assignment.World != layout.WorldSize)
            throw new InvalidDataException($"the assignment's rank {assignment.Rank} of {assignment.World} is not stage {stage}, replica {replica} of dp {dp} x pp {pp} (ranks are stage-major: rank = stage·dp + replica)");

        // ---- Collectives: this stage's ring, then the stage links (a cancel ends either wait at once) ----
        var ringPeers = Enumerable.Range(0, dp).Select(r => EndpointOf(assignment.Peers, layout.Rank(stage, r), "collective")).ToList();
        using var collective = RunCancellation.ConnectRing(
            () => new TcpRendezvous($"{assignment.JobId}/stage-{stage}", assignment.Generation, replica, dp,
                                    new System.Net.IPEndPoint(System.Net.IPAddress.Any, collectivePort)),
            ringPeers, new TcpCollectiveOptions { Timeout = settings.CollectiveTimeout }, ct);
        using var aborting = cancel.Guard(collective);
        using var links = ConnectStageLinks(layout, ct);
        using var abortingLinks = cancel.Abort.Register(links.Dispose);
        var (peak, store) = PeakAndStore(device, storeChannel);

        // ---- Where to resume: every stage at one step, from live states or the committed checkpoint ----
        long restoreStart = System.Diagnostics.Stopwatch.GetTimestamp();
        var held = ReplicaSync.ExchangeHeldSteps(collective, holder.State is { } h ? new HeldState(h.Step, h.Lineage) : new HeldState(-1, 0));
        var plan = ReplicaSync.Decide(held, assignment.ResumeStep);
        // Each stage's choice travels along the pipeline (every replica's pipeline carries the same choices, since the
        // replicas of a stage decided from one exchange): live states only when all stages hold the same step of the same
        // history; otherwise every stage loads the committed checkpoint, and a stage that was ahead redoes its steps.
        var mine = plan.Source == ResumePlan.Replica ? held[plan.SourceRank] : new HeldState(-1, 0);
        var choices = links.GatherAlongPipeline([mine.Step, mine.Lineage >> 32, mine.Lineage & 0xFFFFFFFF]);
        bool together = mine.Step >= 0 && choices.All(c => c[0] == mine.Step && c[1] == mine.Lineage >> 32 && c[2] == (mine.Lineage & 0xFFFFFFFF));
        if (plan.Source == ResumePlan.Replica && !together)
        {
            Log($"stage {stage} could resume from live state at step {plan.Step}, but the stages hold steps {string.Join(", ", choices.Select(c => (long)c[0]))} " +
                $"(-1: none) or another history: every stage loads {(assignment.ResumeStep > 0 ? $"the committed checkpoint of step {assignment.ResumeStep}" : "the start")}");
            plan = assignment.ResumeStep > 0 ? new ResumePlan(held, assignment.ResumeStep, ResumePlan.Checkpoint, -1) : new ResumePlan(held, 0, ResumePlan.Start, -1);
        }
        long stateBytes = Restore(plan, held, collective, restoreStart, $"stage {stage} ", $"replica {plan.SourceRank}",
            () => NewState(config, options, spec.Seed, device, fingerprint, layout),
            (state, loadStart) =>
            {
                var loaded = state.Stage!.LoadCheckpointAsync(store, plan.Step, state.Optimizer, tokenizerReply.TokenizerHash, ct).GetAwaiter().GetResult();
                state.Step = loaded.Step;
                metrics?.CheckpointLoaded(assignment.JobId, settings.WorkerId, System.Diagnostics.Stopwatch.GetElapsedTime(loadStart), StateBytes(state));
                return $"resumed from committed step {loaded.Step} (generation {loaded.Generation}, saved as dp {loaded.Layout.Dp} x pp {loaded.Layout.Pp})";
            });
        // One history for every rank that did not take a live state: the stages can tell next time that their live states belong together.
        if (plan.Source != ResumePlan.Replica) holder.State!.Lineage = GenerationLineage(plan.Step);
        var live = holder.State!;
        var stageModel = live.Stage!;
        using var nccl = dp > 1 ? NcclFor(collective, device, ct) : null;
        using var abortingNccl = nccl is null ? default : cancel.Guard(nccl);
        using var reducer = dp > 1 ? new BucketedGradientReducer((ICollective?)nccl ?? collective) : null;
        using var trainer = new PipelineTrainer(stageModel, source, options, device, peak, links, replica, dp, reducer, live.Optimizer);
        trainer.ResumeAt(live.Step, live.Optimizer.StepCount);
        double restoreSeconds = ReplicaSync.Seconds(restoreStart);
        ReportResumed(plan, live.Step, restoreSeconds, stateBytes); // rank 0 is stage 0: its ring's ranks are global ranks 0..dp-1
        Log($"generation {assignment.Generation}: rank {assignment.Rank} of {assignment.World} = stage {stage} (layers {stageModel.Layers.FirstLayer}..{stageModel.Layers.End - 1}) " +
            $"of replica {replica}, dp {dp} x pp {pp}; global batch {options.GlobalBatch} = {dp} x {options.MicroBatch} x {options.Accumulation(dp)} micro-batches, " +
            $"from step {live.Step} ({plan.Source})");

        // ---- Checkpoints and the loop: this stage's tensors under its file rank ----
        var sharding = new ShardingPlan(layout, stageModel.CheckpointCatalog);
        TrainToTheEnd(new StepLoop(trainer.TrainStep, () => trainer.Step, () => trainer.ConsumedSamples, trainer.Optimizer,
                                   () => stageModel.StageTensors(trainer.Optimizer), a => trainer.BeforeOptimizerUpdate = a),
                      sharding, options, config, live, store, tokenizerReply.TokenizerHash, ct);

        // ---- The end: rank 0 holds only stage 0, so it loads the whole model from the committed final checkpoint ----
        if (assignment.Rank == 0 && trainer.Step >= options.Steps) FinishFromCheckpoint(spec, config, options, device, data, tokenizerReply, store, ct);
    }

    string EndpointOf(IDictionary<int, string> endpoints, int rank, string what) =>
        endpoints.TryGetValue(rank, out var e) && e.Length > 0 ? e
            : throw new InvalidDataException($"the assignment lists no {what} endpoint for rank {rank}");

    /// <summary>
    /// Accepts the stage before (on this worker's pipeline port) while dialling the stage after, on a dedicated thread: a
    /// cancel ends the wait at once and closes the listener; an abandoned dial gives up at the collective timeout, and a
    /// late one is refused by the next generation's handshake.
    /// </summary>
    PipelineLinks ConnectStageLinks(ParallelLayout layout, CancellationToken ct)
    {
        int stage = assignment.PpStage, replica = assignment.DpRank;
        string? previous = stage > 0 ? EndpointOf(assignment.StagePeers, layout.Rank(stage - 1, replica), "pipeline") : null;
        string? next = stage < layout.Pp - 1 ? EndpointOf(assignment.StagePeers, layout.Rank(stage + 1, replica), "pipeline") : null;
        var listener = stage > 0 ? new StageListener(assignment.JobId, assignment.Generation, stage, replica,
                                                     new System.Net.IPEndPoint(System.Net.IPAddress.Any, pipelinePort)) : null;
        var connecting = Task.Factory.StartNew(
            () => PipelineLinks.Connect(assignment.JobId, assignment.Generation, stage, layout.Pp, replica, listener, previous, next, settings.CollectiveTimeout),
            CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        try
        {
            connecting.Wait(ct);
            Log($"pipeline links formed: {(previous is null ? "" : $"stage {stage - 1} at {previous}")}{(previous is not null && next is not null ? ", " : "")}" +
                $"{(next is null ? "" : $"stage {stage + 1} at {next}")}");
            return connecting.Result;
        }
        catch (OperationCanceledException)
        {
            _ = connecting.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); else _ = t.Exception; }, TaskScheduler.Default);
            throw;
        }
        catch (AggregateException e) when (e.InnerException is not null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(e.InnerException);
            throw;
        }
        finally { listener?.Dispose(); } // an accepted link lives on without it; the next generation binds the port again
    }

    /// <summary>Names the history that starts in this generation at <paramref name="step"/>: the same on every rank, another in every generation.</summary>
    long GenerationLineage(long step)
    {
        var hash = System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes($"{assignment.JobId}\n{assignment.Generation}\n{step}"));
        return Math.Max(1, BitConverter.ToInt64(hash, 0) & long.MaxValue);
    }

    /// <summary>
    /// The end of a pipeline run on rank 0: the final checkpoint commits once every stage's file is reported (and the
    /// Coordinator stops the ranks only after that), so rank 0 waits for the commit until the run is cancelled, loads the
    /// whole model from it (any layout loads into one model) and evaluates, samples and writes the Hugging Face folder
    /// from that. Without a committed final checkpoint there is no whole model to write: said, not guessed.
    /// </summary>
    void FinishFromCheckpoint(JobSpec spec, DeepSeekConfig config, TrainingOptions options, Device device, DataShards.DataShardsClient data,
                              GetTokenizerReply tokenizerReply, GrpcCheckpointStore store, CancellationToken boundary)
    {
        long final = options.Steps;
        while (true)
        {
            bool ending = boundary.IsCancellationRequested; // looked at before the store, so a commit before the Stop is seen
            try
            {
                if (store.ListStepsAsync(CancellationToken.None).GetAwaiter().GetResult().Contains(final)) break;
            }
            catch (Grpc.Core.RpcException e) { Log($"could not list the committed checkpoints: {e.Status.Detail}"); }
            if (ending)
            {
                Log($"the final checkpoint (step {final}) is not committed and the run ended: no validation loss, sample or model folder from rank 0");
                return;
            }
            boundary.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(250));
        }
        long loadStart = System.Diagnostics.Stopwatch.GetTimestamp();
        using var model = new DeepSeekForCausalLM(config);
        model.to(device);
        var loaded = ShardedCheckpointLoader.LoadReplicaAsync(store, final, model, null, tokenizerReply.TokenizerHash).GetAwaiter().GetResult();
        Log($"loaded the whole model from committed step {final} (saved as dp {loaded.Layout.Dp} x pp {loaded.Layout.Pp}) in {ReplicaSync.Seconds(loadStart):0.###} s");
        Finish(spec, options, device, data, tokenizerReply, model, validation => Trainer.Evaluate(model, validation, options, device, 4));
    }

    /// <summary>The group's NCCL unique id as the Coordinator hands it on (ClusterWorker delivers it as it arrives).</summary>
    public void DeliverNcclUniqueId(NcclUniqueId id)
    {
        if (id.Generation == assignment.Generation && id.Group == assignment.PpStage) ncclId.TrySetResult(id);
    }

    /// <summary>
    /// Where the gradients are all-reduced: on CUDA, an NCCL communicator of the ring's ranks; on CPU, null: the tcp ring
    /// itself, which also stays for the small exchanges (held steps, a live state for a rank behind). The ring's first
    /// rank makes the communicator's unique id and sends it up; the Coordinator hands it to the others (or the reason
    /// it could not, so they fail at once instead of waiting out the timeout).
    /// </summary>
    NcclCollective? NcclFor(TcpCollective ring, Device device, CancellationToken ct)
    {
        if (Collective.BackendFor(device) != "nccl") return null;
        long generation = assignment.Generation;
        int group = assignment.PpStage;
        byte[] id;
        if (ring.Rank == 0)
        {
            try { id = NcclCollective.CreateUniqueId(); }
            catch (CollectiveException e)
            {
                send(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = generation, Group = group, Reason = e.Message } });
                throw;
            }
            send(new WorkerMessage { NcclUniqueId = new NcclUniqueId { Generation = generation, Group = group, Id = Google.Protobuf.ByteString.CopyFrom(id) } });
        }
        else
        {
            if (!ncclId.Task.Wait(settings.CollectiveTimeout, ct))
                throw new CollectiveException(CollectiveFailure.PeerStalled,
                    $"the NCCL unique id of generation {generation} (group {group}) did not come from the coordinator within {settings.CollectiveTimeout.TotalSeconds:0.#} s");
            var shared = ncclId.Task.Result;
            if (shared.Id.IsEmpty)
                throw new CollectiveException(CollectiveFailure.Unavailable, $"the first rank of group {group} could not make the NCCL unique id of generation {generation}: {shared.Reason}");
            id = shared.Id.ToByteArray();
        }
        var nccl = NcclCollective.Create(id, ring.Rank, ring.WorldSize, generation, device, settings.CollectiveTimeout);
        Log($"NCCL {NcclCollective.Inspect().Version}: a communicator of {ring.WorldSize} rank(s) on {device} all-reduces the gradients");
        return nccl;
    }

    /// <summary>The device's matmul peak (measured once per process) and this run's checkpoint store.</summary>
    (double Peak, GrpcCheckpointStore Store) PeakAndStore(Device device, Grpc.Net.Client.GrpcChannel storeChannel)
    {
        double peak = Peaks.GetOrAdd(device.ToString(), _ => MatmulPeak.Measure(device, ScalarType.Float32, MatmulPeak.SizeFor(device, 512), TimeSpan.FromMilliseconds(300)).FlopsPerSecond);
        var store = new GrpcCheckpointStore(new CheckpointStoreClient(storeChannel), settings.Checkpoints.ToString(), assignment.JobId,
                                            Path.Combine(settings.OutputDir, "staging", settings.WorkerId));
        metrics?.CheckpointRunStarted(assignment.JobId, settings.WorkerId);
        return (peak, store);
    }

    /// <summary>
    /// Makes the holder's live state the one <paramref name="plan"/> names, and returns the bytes restored: the source's
    /// live state copied over <paramref name="collective"/> to the ranks behind it; or a state loaded from the committed
    /// checkpoint (<paramref name="loadCheckpoint"/> fills it and returns what to log); or fresh weights for the start.
    /// A held state behind the checkpoint, or one the start must replace, is thrown away first.
    /// </summary>
    long Restore(ResumePlan plan, IReadOnlyList<HeldState> held, ICollective collective, long restoreStart, string who, string source,
                 Func<ReplicaState> fresh, Func<ReplicaState, long, string> loadCheckpoint)
    {
        if (plan.Source == ResumePlan.Replica)
        {
            var state = holder.State ?? fresh();
            long sent = plan.AnyRankBehind ? BroadcastLiveState(collective, plan.SourceRank, state) : 0;
            Log($"{who}resuming at step {plan.Step} from the live state of {source} (held steps: {string.Join(", ", held.Select(x => x.Step))}; " +
                $"{sent} bytes in {ReplicaSync.Seconds(restoreStart):0.###} s)");
            return sent;
        }
        if (holder.State is { Step: not 0 } || plan.Source == ResumePlan.Checkpoint && holder.State is not null) holder.Drop();
        var restored = holder.State ?? fresh();
        if (plan.Source != ResumePlan.Checkpoint)
        {
            restored.Step = 0;
            return 0;
        }
        Log(who + loadCheckpoint(restored, System.Diagnostics.Stopwatch.GetTimestamp()));
        return StateBytes(restored);
    }

    static long StateBytes(ReplicaState state) => state.Tensors().Sum(kv => kv.Value.numel() * kv.Value.element_size());

    /// <summary>Rank 0 tells the Coordinator where the generation resumed and what the restore cost.</summary>
    void ReportResumed(ResumePlan plan, long step, double restoreSeconds, long stateBytes)
    {
        if (assignment.Rank != 0) return;
        send(new WorkerMessage
        {
            Resumed = new Resumed
            {
                Generation = assignment.Generation, Step = step, Source = plan.Source, SourceRank = plan.SourceRank,
                RestoreSeconds = restoreSeconds, StateBytes = stateBytes,
            },
        });
    }

    /// <summary>Copies the live state of <paramref name="sourceRank"/> over the ring to the ranks behind it; the bytes sent.</summary>
    static long BroadcastLiveState(ICollective collective, int sourceRank, ReplicaState state)
    {
        long step = state.Step, optimizerSteps = state.Optimizer.StepCount, lineage = state.Lineage;
        state.Step = -1; // half-copied tensors are no state
        long bytes = ReplicaSync.Broadcast(collective, sourceRank, state.Tensors(), ref step, ref optimizerSteps, ref lineage);
        state.Optimizer.StepCount = optimizerSteps;
        state.Lineage = lineage;
        state.Step = step;
        return bytes;
    }

    /// <summary>
    /// The whole model from the seed (every rank builds the same weights) with its AdamW; given the <paramref name="pipeline"/>
    /// layout, shrunk to this worker's stage, the AdamW over the stage's parameters only.
    /// </summary>
    ReplicaState NewState(DeepSeekConfig config, TrainingOptions options, int seed, Device device, string fingerprint, ParallelLayout? pipeline = null)
    {
        manual_seed(seed);
        var model = new DeepSeekForCausalLM(config).InitializeWeights();
        model.to(device);
        var stage = pipeline is null ? null : new PipelineStage(model, pipeline, assignment.PpStage);
        holder.State = new ReplicaState
        {
            JobId = assignment.JobId, Fingerprint = fingerprint, Model = model, Stage = stage,
            Optimizer = stage is null ? Trainer.CreateOptimizer(model, options) : PipelineTrainer.CreateOptimizer(stage, options),
        };
        return holder.State;
    }

    /// <summary>Routed-token fractions, layers × experts flattened (a layer that routed nothing reports zeros).</summary>
    static float[] ExpertFractions(StepMetrics m) =>
        [.. m.ExpertLoad.SelectMany(load => { double total = load.Sum(); return load.Select(l => total == 0 ? 0f : (float)(l / total)); })];

    /// <summary>The model-layer index of each MoE layer: main layers after the dense ones, then the MTP modules (HF numbering).</summary>
    static int[] ExpertLayers(DeepSeekConfig config, int count) =>
        [.. Enumerable.Range(0, count).Select(i => i < config.NumMoeLayers ? config.FirstKDenseReplace + i : config.NumHiddenLayers + (i - config.NumMoeLayers))];

    void Log(string message) { lock (log) log.WriteLine($"[rank {assignment.Rank}] {message}"); }
}
