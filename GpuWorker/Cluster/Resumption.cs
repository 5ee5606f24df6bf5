// Where a generation resumes on this worker and the live state it resumes from: a replica's live state (broadcast to
// the ranks behind it), the committed checkpoint, or fresh weights from the seed.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

sealed class Resumption(RunContext run, JobPlan plan, Device device, ParallelLayout layout, GrpcCheckpointStore store, string tokenizerHash,
                        CancellationToken ct)
{
    Assignment A => run.Assignment;
    ReplicaHolder Holder => run.Holder;
    bool Pipeline => layout.Pp > 1;

    /// <summary>
    /// Agrees over <paramref name="ring"/> (and, for a stage, along <paramref name="links"/>) where to resume, makes the
    /// holder's live state that step's, and returns the plan and the bytes restored.
    /// </summary>
    public (ResumePlan Plan, long Bytes) Restore(ICollective ring, PipelineLinks? links)
    {
        long restoreStart = System.Diagnostics.Stopwatch.GetTimestamp();
        var held = ReplicaSync.ExchangeHeldSteps(ring, Holder.State is { } h ? new HeldState(h.Step, h.Lineage) : new HeldState(-1, 0));
        var resume = ReplicaSync.Decide(held, A.ResumeStep);
        if (Redundant)
        {
            // The held shards may be of another layout (a rescale) or miss a lost rank's (its ZeRO shard, under ep its expert
            // shard's rows): the survivors' own pieces and neighbour copies rebuild every rank's state of this layout, or,
            // where one is held nowhere, the checkpoint. Every stage of a pipeline takes part, whatever its ring decided.
            if (ReshardLive(ring, held, resume, links) is { } live) return live;
            if (resume.Source == ResumePlan.Replica)
                resume = A.ResumeStep > 0 ? new ResumePlan(held, A.ResumeStep, ResumePlan.Checkpoint, -1) : new ResumePlan(held, 0, ResumePlan.Start, -1);
        }
        // Before the stages agree: a stage of an ep x pp job that must load the checkpoint makes every stage load it.
        if ((layout.Zero > 0 || layout.Ep > 1) && resume.Source == ResumePlan.Replica && resume.AnyRankBehind)
        {
            // A ZeRO rank's optimizer state is its shard alone, held nowhere else, and an expert-parallel rank's experts
            // are not the source's (the broadcast copies one rank's tensors to all): a rank behind cannot copy its state
            // from another replica. Every rank decides this from the same exchange, so all load the committed checkpoint.
            string why = layout.Zero > 0 ? $"ZeRO {layout.Zero} shards are held once" : $"with ep {layout.Ep} the ranks hold different experts";
            run.Log($"rank {A.Rank} could resume from live state at step {resume.Step}, but a rank is behind and {why}: " +
                    $"every rank loads {(A.ResumeStep > 0 ? $"the committed checkpoint of step {A.ResumeStep}" : "the start")}");
            resume = A.ResumeStep > 0 ? new ResumePlan(held, A.ResumeStep, ResumePlan.Checkpoint, -1) : new ResumePlan(held, 0, ResumePlan.Start, -1);
        }
        if (links is not null) resume = AgreeAlongPipeline(resume, held, links);
        string who = Pipeline ? $"stage {A.PpStage} " : "", source = Pipeline ? $"replica {resume.SourceRank}" : $"rank {resume.SourceRank}";
        long bytes;
        if (resume.Source == ResumePlan.Replica)
        {
            var state = Holder.State ?? NewState();
            bytes = resume.AnyRankBehind ? BroadcastLiveState(ring, resume.SourceRank, state, plan.Spec.Guard.Window) : 0;
            run.Log($"{who}resuming at step {resume.Step} from the live state of {source} (held steps: {string.Join(", ", held.Select(x => x.Step))}; " +
                    $"{bytes} bytes in {ReplicaSync.Seconds(restoreStart):0.###} s)");
        }
        else
        {
            // A held state behind the checkpoint, or one the start must replace (or of another ZeRO layout), is thrown away first.
            if (Holder.State is { Step: not 0 } || resume.Source == ResumePlan.Checkpoint && Holder.State is not null
                || Holder.State is { } s && (layout.Zero > 0 || layout.Ep > 1) && (s.ZeroShard, s.ZeroShards) != (A.DpRank, A.DpSize)) Holder.Drop();
            var restored = Holder.State ?? NewState();
            if (resume.Source == ResumePlan.Checkpoint) bytes = LoadCheckpoint(restored, resume.Step, who);
            else
            {
                restored.Step = 0;
                restored.Guard = null;
                bytes = 0;
            }
            // One history for every stage (or expert shard) that did not take a live state: next time the ranks can tell
            // that their live states belong together. Without it every rank's own random lineage would make each one
            // look behind the others, and an ep job, which cannot copy a live state, would reload the checkpoint.
            if (Pipeline || layout.Ep > 1 || layout.Zero > 0) restored.Lineage = GenerationLineage(resume.Step);
        }
        if (Redundant) RefreshNeighbour(ring);
        return (resume, bytes);
    }

    /// <summary>
    /// parallel.redundancy on a sharded ring (ZeRO, or ep): each rank keeps its neighbour's singly held pieces (none on a
    /// ring of one, nor where every piece has two holders: zero 0 with dp &gt; ep). In a pipeline the ring is the stage's
    /// replicas, and the pieces are the stage's own state's.
    /// </summary>
    bool Redundant => plan.Spec.Parallel.Redundancy && (layout.Zero > 0 || layout.Ep > 1);

    /// <summary>
    /// The live reshard: when every shard of the newest held step is held by a survivor (its own rank's, or the copy its
    /// neighbour keeps), every rank's state of this layout is rebuilt from them over the ring; null (said why) otherwise.
    /// A stage of a pipeline reshards only when every stage's cover is of the same step and history (a stage whose lost
    /// rank's pieces are held nowhere makes every stage load the checkpoint: the stages must hold one step together).
    /// </summary>
    (ResumePlan Plan, long Bytes)? ReshardLive(ICollective ring, HeldState[] held, ResumePlan resume, PipelineLinks? links)
    {
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        bool live = resume.Source == ResumePlan.Replica; // the same on every rank of the ring: one exchange decided it
        var (cover, why) = live ? LiveShards.Cover(LiveShards.Exchange(ring, Holder.State), resume.Step, resume.SourceRank, layout.Dp, layout.Ep, layout.Zero)
                                : (null, "");
        if (links is not null && !CoveredAlongPipeline(cover, links, out var stages))
        {
            if (cover is not null) why = $"stage {A.PpStage} is covered, but the stages' covers are of steps {stages} (-1: none) or another history";
            cover = null;
        }
        if (cover is null)
        {
            if (live)
                run.Log($"{(Pipeline ? $"stage {A.PpStage} " : "")}rank {A.Rank} cannot resume from live state at step {resume.Step}: {why}; every rank loads " +
                        (A.ResumeStep > 0 ? $"the committed checkpoint of step {A.ResumeStep}" : "the start"));
            return null;
        }
        long bytes = 0;
        var heldGuard = Holder.State?.Guard;
        if (!cover.InPlace)
        {
            var old = Holder.State;
            // A rank off the cover's step receives the weights: half-received weights are no state of any step.
            if (old is not null && !cover.Current[ring.Rank]) old.Step = -1;
            // The model (weights replicated under ZeRO 1 and 2) stays, unless it holds another expert shard's experts (a
            // rank whose replica moved to another shard, or a spare, builds one); the optimizer is built anew over this rank's rows.
            bool keepModel = old is not null && old.ZeroShard % layout.Ep == A.DpRank % layout.Ep;
            var target = NewState(keepModel ? old!.Model : null, keepModel ? old!.Stage : null);
            try { bytes = LiveShards.Reshard(ring, cover, old, target); }
            catch
            {
                // A peer lost during the reshard: the old shard and copy stay held, so the next generation can try again.
                target.Optimizer.Dispose();
                if (!keepModel) target.Model.Dispose(); // a model from the seed
                Holder.State = old;
                throw;
            }
            if (old is not null)
            {
                old.Neighbour?.Dispose();
                old.Optimizer.Dispose();
                if (!keepModel) old.Model.Dispose();
            }
        }
        // The rebuilt state has no step guard window, and a spare never had one: every rank takes the source's.
        Holder.State!.Guard = BroadcastGuard(ring, cover.Source, heldGuard, plan.Spec.Guard.Window);
        var pieces = cover.Pieces.All().ToArray();
        var copies = string.Join(", ", Enumerable.Range(0, pieces.Length).Where(i => cover.FromCopy[i]).Select(i => $"{pieces[i]} from rank {cover.Holders[i]}'s copy"));
        run.Log($"{(Pipeline ? $"stage {A.PpStage} " : "")}resuming at step {cover.Step} from the live shards of the survivors: {cover.Shards} shard(s){(layout.Ep > 1 ? $" (ep {layout.Ep})" : "")} resharded onto dp {layout.Dp}" +
                (copies.Length > 0 ? $" ({copies})" : "") + $"; {bytes} bytes in {ReplicaSync.Seconds(start):0.###} s");
        RefreshNeighbour(ring);
        return (new ResumePlan(held, cover.Step, ResumePlan.Shards, cover.Source), bytes);
    }

    /// <summary>
    /// Whether every stage's cover (this one's <paramref name="cover"/>; null: none) is of the same step and history, told
    /// along the pipeline as <see cref="AgreeAlongPipeline"/> tells the stages' choices; <paramref name="stages"/>: their steps.
    /// </summary>
    bool CoveredAlongPipeline(ShardCover? cover, PipelineLinks links, out string stages)
    {
        long step = cover?.Step ?? -1, lineage = cover?.Lineage ?? 0;
        var covers = links.GatherAlongPipeline([step, lineage >> 32, lineage & 0xFFFFFFFF]);
        stages = string.Join(", ", covers.Select(c => (long)c[0]));
        return step >= 0 && covers.All(c => c[0] == step && c[1] == lineage >> 32 && c[2] == (lineage & 0xFFFFFFFF));
    }

    void RefreshNeighbour(ICollective ring)
    {
        var state = Holder.State!;
        long sent = LiveShards.Refresh(ring, state);
        if (state.Neighbour is null) return; // a ring of one has no neighbour
        run.Log($"redundancy: holds the copy of shard {state.Neighbour!.Shard} at step {state.Step} ({state.Neighbour.Words.numel() * state.Neighbour.Words.element_size()} bytes; sent {sent})");
    }

    /// <summary>
    /// Each stage's choice travels along the pipeline (every replica's pipeline carries the same choices, since the
    /// replicas of a stage decided from one exchange): live states only when all stages hold the same step of the same
    /// history; otherwise every stage loads the committed checkpoint, and a stage that was ahead redoes its steps.
    /// </summary>
    ResumePlan AgreeAlongPipeline(ResumePlan resume, HeldState[] held, PipelineLinks links)
    {
        var mine = resume.Source == ResumePlan.Replica ? held[resume.SourceRank] : new HeldState(-1, 0);
        var choices = links.GatherAlongPipeline([mine.Step, mine.Lineage >> 32, mine.Lineage & 0xFFFFFFFF]);
        bool together = mine.Step >= 0 && choices.All(c => c[0] == mine.Step && c[1] == mine.Lineage >> 32 && c[2] == (mine.Lineage & 0xFFFFFFFF));
        if (resume.Source != ResumePlan.Replica || together) return resume;
        run.Log($"stage {A.PpStage} could resume from live state at step {resume.Step}, but the stages hold steps {string.Join(", ", choices.Select(c => (long)c[0]))} " +
                $"(-1: none) or another history: every stage loads {(A.ResumeStep > 0 ? $"the committed checkpoint of step {A.ResumeStep}" : "the start")}");
        return A.ResumeStep > 0 ? new ResumePlan(held, A.ResumeStep, ResumePlan.Checkpoint, -1) : new ResumePlan(held, 0, ResumePlan.Start, -1);
    }

    /// <summary>Loads committed step <paramref name="step"/> into <paramref name="state"/> (a stage reads only its rows); the bytes restored.</summary>
    long LoadCheckpoint(ReplicaState state, long step, string who)
    {
        long loadStart = System.Diagnostics.Stopwatch.GetTimestamp();
        string what;
        long read;
        if (state.Stage is { } stage)
        {
            var loaded = TrainingThread.Wait(stage.LoadCheckpointAsync(store, step, state.Optimizer, tokenizerHash, ct));
            state.Step = loaded.Step;
            read = StateBytes(state);
            what = $"resumed from committed step {loaded.Step} (generation {loaded.Generation}, saved as dp {loaded.Layout.Dp} x pp {loaded.Layout.Pp})";
        }
        else
        {
            var loaded = TrainingThread.Wait(ShardedCheckpointLoader.LoadReplicaAsync(store, step, state.Model, state.Optimizer, tokenizerHash, ct));
            state.Optimizer.StepCount = loaded.OptimizerSteps;
            state.Step = loaded.Step;
            read = loaded.Files.Sum(f => f.Size); // a replica reads every file of the checkpoint (each rank's shard)
            what = $"resumed from committed step {loaded.Step} (generation {loaded.Generation}, {loaded.ConsumedSamples} samples consumed)";
        }
        // The rule's window as it was at the committed step (a checkpoint saved before it was kept: the rule starts afresh).
        state.Guard = TrainingThread.Wait(store.ReadGuardStateAsync(step, ct));
        run.Metrics?.CheckpointLoaded(A.JobId, run.WorkerId, System.Diagnostics.Stopwatch.GetElapsedTime(loadStart), read);
        run.Log(who + what + (state.Guard is { } g ? $"; step guard {g}" : "; no step guard state in it"));
        return StateBytes(state);
    }

    static long StateBytes(ReplicaState state) => state.Tensors().Sum(kv => kv.Value.numel() * kv.Value.element_size());

    /// <summary>Rank 0 tells the Coordinator where the generation resumed and what the restore cost.</summary>
    public void Report(ResumePlan resume, long step, double restoreSeconds, long stateBytes)
    {
        if (A.Rank != 0) return; // rank 0 is stage 0: its ring's ranks are global ranks 0..dp-1
        run.Send(new WorkerMessage
        {
            Resumed = new Resumed
            {
                Generation = A.Generation, Step = step, Source = resume.Source, SourceRank = resume.SourceRank,
                RestoreSeconds = restoreSeconds, StateBytes = stateBytes,
            },
        });
    }

    /// <summary>Copies the live state of <paramref name="sourceRank"/> over the ring to the ranks behind it; the bytes sent.</summary>
    static long BroadcastLiveState(ICollective collective, int sourceRank, ReplicaState state, int guardWindow)
    {
        long step = state.Step, optimizerSteps = state.Optimizer.StepCount, lineage = state.Lineage;
        state.Step = -1; // half-copied tensors are no state
        long bytes = ReplicaSync.Broadcast(collective, sourceRank, state.Tensors(), ref step, ref optimizerSteps, ref lineage);
        // The step guard's window with it: every rank then judges the next steps on the source's history.
        state.Guard = BroadcastGuard(collective, sourceRank, state.Guard, guardWindow);
        state.Optimizer.StepCount = optimizerSteps;
        state.Lineage = lineage;
        state.Step = step;
        return bytes;
    }

    /// <summary>
    /// The whole model from the seed (every rank builds the same weights) with its AdamW; for a pipeline stage, shrunk to
    /// this worker's stage, the AdamW over the stage's parameters only.
    /// </summary>
    /// <summary>The step guard's state of <paramref name="sourceRank"/> on every rank.</summary>
    static GuardState? BroadcastGuard(ICollective collective, int sourceRank, GuardState? held, int guardWindow)
    {
        using var guard = tensor(collective.Rank == sourceRank && held is { } g ? g.ToLongs(guardWindow) : new long[GuardState.Longs(guardWindow)]);
        collective.Broadcast(guard, sourceRank);
        return GuardState.FromLongs(guard.data<long>().ToArray(), guardWindow);
    }

    /// <param name="keepStage">The stage <paramref name="keep"/> belongs to (pp &gt; 1): the same stage of a layout with the same pp
    /// (the fingerprint names the stage), whose split of the layers and checkpoint catalogue stay; its optimizer is built anew.</param>
    ReplicaState NewState(DeepSeekForCausalLM? keep = null, PipelineStage? keepStage = null)
    {
        if (keep is not null)
        {
            var optimizer = keepStage is not null ? PipelineTrainer.CreateOptimizer(keepStage, plan.Options, A.DpRank, A.DpSize)
                : Trainer.CreateOptimizer(keep, plan.Options, A.DpRank, A.DpSize);
            return Holder.State = new ReplicaState
            {
                JobId = A.JobId, Fingerprint = plan.Fingerprint, Model = keep, Stage = keepStage, ZeroShard = A.DpRank, ZeroShards = A.DpSize, Ep = layout.Ep, Optimizer = optimizer,
                ShardedParameters = layout.Zero >= 3, Shapes = Shapes(optimizer),
            };
        }
        var model = DeepSeekForCausalLM.FromSeed(plan.Config, plan.Spec.Seed); // under the process-wide seed lock: in-process workers build at once
        // initFrom: pretrained weights instead of the seed's (a committed checkpoint, when one is loaded next, replaces them).
        if (plan.Spec.InitFrom is { } pretrained)
        {
            PretrainedWeights.LoadInto(model, pretrained);
            run.Log($"initFrom: the model starts from the weights of {pretrained}");
        }
        // Expert parallelism: the whole model is built from the seed (so every expert starts as in one process), then
        // this rank keeps its shard's experts; the optimizer puts them last (Trainer.CreateOptimizer with the options' ep).
        if (layout.Ep > 1) ExpertParallel.ShardModel(model, layout, A.Rank);
        model.to(device);
        if (plan.Options.Precision == "bf16") model.to(ScalarType.BFloat16); // AdamW keeps fp32 master weights and moments
        var stage = Pipeline ? new PipelineStage(model, layout, A.PpStage) : null;
        var created = stage is null ? Trainer.CreateOptimizer(model, plan.Options, A.DpRank, A.DpSize) : PipelineTrainer.CreateOptimizer(stage, plan.Options, A.DpRank, A.DpSize);
        Holder.State = new ReplicaState
        {
            JobId = A.JobId, Fingerprint = plan.Fingerprint, Model = model, Stage = stage,
            // Under ep the replica also names the expert shard the model holds (a reshard reads it).
            ZeroShard = layout.Zero > 0 || layout.Ep > 1 ? A.DpRank : -1, ZeroShards = layout.Zero > 0 || layout.Ep > 1 ? A.DpSize : 0, Ep = layout.Ep, Optimizer = created,
            ShardedParameters = layout.Zero >= 3, Shapes = Shapes(created),
        };
        return Holder.State;
    }

    /// <summary>The whole shapes, taken while the parameters are whole (a ZeRO-3 trainer empties them between uses).</summary>
    static long[][] Shapes(Training.Optim.AdamW optimizer) => [.. optimizer.Slots.Select(s => s.Param.shape)];

    /// <summary>Names the history that starts in this generation at <paramref name="step"/>: the same on every rank, another in every generation.</summary>
    long GenerationLineage(long step)
    {
        var hash = System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes($"{A.JobId}\n{A.Generation}\n{step}"));
        return Math.Max(1, BitConverter.ToInt64(hash, 0) & long.MaxValue);
    }
}
