// The worker's resume decision (Resumption.Restore: held steps, each stage's live cover, the agreement along the pipeline,
// then the reshard or the checkpoint load) for a pp 2 x dp 3 x zero 1 job with parallel.redundancy re-formed onto
// pp 2 x dp 2, and for a pp 2 x dp 2 x ep 2 x zero 2 bf16 job whose lost rank a spare replaces: the ranks are threads of
// this process, each stage's replicas a real tcp ring and each replica's stages joined by real stage links, the committed
// checkpoint in the real CheckpointStore. Not the reshard's arithmetic (LiveShardsPipelineTests) nor a whole cluster job
// (RedundancyPipelineClusterTests).
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using Assignment = DeepSeekCluster.Contracts.Control.Assignment;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tests.Pipeline;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class RedundancyPipelineResumptionTests(ITestOutputHelper output) : IAsyncLifetime
{
    const string Job = "pp-redundancy-resume";
    const int Pp = 2;
    const long LiveStep = 5, CommittedStep = 3, LiveOptimizerSteps = 17;
    static readonly string TokenizerHash = new('c', 64);

    /// <summary>
    /// The job re-formed: its dp before (<paramref name="OldDp"/>) and after, its zero, ep and precision. tiny with 101
    /// vocabulary rows (split unevenly over 3 and 2 replicas): 4 layers, 2 per stage, the MTP block on stage 1.
    /// </summary>
    sealed record JobCase(int OldDp, int NewDp, int Zero, int Ep, string Precision)
    {
        public static readonly JobCase Zero1Dp3ToDp2 = new(3, 2, 1, 1, "fp32");
        public static readonly JobCase Ep2Zero2Bf16 = new(2, 2, 2, 2, "bf16");

        public JobSpec Spec => new()
        {
            Name = Job, ModelPreset = "tiny", Dataset = "d", GlobalBatch = 8, MicroBatch = 2, SeqLen = 16, Steps = 10, Seed = 5, Precision = Precision,
            Parallel = new ParallelPlan { Dp = NewDp, Pp = Pp, Zero = Zero, Ep = Ep, Redundancy = true },
        };

        public JobPlan PlanOf(int stage)
        {
            var (config, options) = JobPlan.Map(Spec, vocabSize: 101, eosTokenId: 0);
            return new JobPlan(Spec, config, options, $"{Job}/stage {stage}"); // the fingerprint names the stage, as JobPlan.For's does
        }

        public DeepSeekConfig Config => PlanOf(0).Config;

        public ParallelLayout Layout(int dp) => ParallelLayout.Even(dp, Pp, Config.NumHiddenLayers).WithShards(Ep, Zero, Config.NRoutedExperts);

        public bool Bf16 => Precision == "bf16";
    }

    StoreHost host = null!;
    readonly string staging = Directory.CreateTempSubdirectory("pp-resume-staging-").FullName;

    public async Task InitializeAsync() => host = await StoreHost.StartAsync();

    public async Task DisposeAsync()
    {
        await host.DisposeAsync();
        Directory.Delete(staging, recursive: true);
    }

    /// <summary>
    /// One whole model and AdamW state with values drawn from <paramref name="seed"/> everywhere: fp32, as the cluster trains
    /// on CPU, or bf16 with fp32 master rows that bf16 cannot hold (the weights are the masters rounded, as AdamW writes them).
    /// </summary>
    sealed class Whole : IDisposable
    {
        public readonly JobCase Case;
        public readonly DeepSeekForCausalLM Model;
        public readonly Training.Optim.AdamW Optimizer;
        public readonly Dictionary<string, Tensor> Tensors;

        public Whole(int seed, JobCase job)
        {
            Case = job;
            Model = DeepSeekForCausalLM.FromSeed(job.Config, 5);
            if (job.Bf16) Model.to(ScalarType.BFloat16);
            var generator = new Generator((ulong)seed);
            // Weights and routing biases alike: a checkpoint load or a reshard that missed one would show.
            using (no_grad()) foreach (var (_, t) in CheckpointTensors.Collect(Model, null)) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
            Optimizer = Trainer.CreateOptimizer(Model, job.PlanOf(0).Options with { Ep = 1 });
            using (no_grad())
            {
                foreach (var (_, t) in Optimizer.StateTensors()) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator).abs_());
                if (job.Bf16) foreach (var s in Optimizer.Slots) s.Param.copy_(s.Master!);
            }
            Tensors = CheckpointTensors.Collect(Model, Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value);
        }

        /// <summary>
        /// Stage <paramref name="stage"/>, replica <paramref name="replica"/> of the old layout at step 5: the stage's weights
        /// (under ep its expert shard's experts) and its ZeRO rows of the optimizer state.
        /// </summary>
        public ReplicaState Replica(int stage, int replica)
        {
            var layout = Case.Layout(Case.OldDp);
            var model = DeepSeekForCausalLM.FromSeed(Case.Config, 5);
            if (Case.Ep > 1) ExpertParallel.ShardModel(model, layout, layout.Rank(stage, replica));
            if (Case.Bf16) model.to(ScalarType.BFloat16);
            using (no_grad()) foreach (var (name, t) in CheckpointTensors.Collect(model, null)) t.copy_(Tensors[name]);
            var pipelineStage = new PipelineStage(model, layout, stage);
            var optimizer = PipelineTrainer.CreateOptimizer(pipelineStage, Case.PlanOf(stage).Options, replica, Case.OldDp);
            optimizer.LoadStateTensors(Tensors.Where(kv => kv.Key.StartsWith("optimizer.", StringComparison.Ordinal)).ToDictionary(), "the whole state");
            optimizer.StepCount = LiveOptimizerSteps;
            return new ReplicaState
            {
                JobId = Job, Fingerprint = Case.PlanOf(stage).Fingerprint, Model = model, Stage = pipelineStage, Optimizer = optimizer,
                ZeroShard = replica, ZeroShards = Case.OldDp, Ep = Case.Ep, Step = LiveStep, Lineage = 77,
            };
        }

        public void Dispose()
        {
            Optimizer.Dispose();
            Model.Dispose();
        }
    }

    sealed record Restored(int Stage, int Replica, ResumePlan Plan, string Log, ReplicaState State);

    /// <summary>
    /// The old layout at step 5, every stage's ring refreshed (each replica holds its neighbour's singly held pieces),
    /// re-formed as generation 2 onto the new dp with step 3 committed: new replica d of stage s holds <paramref name="members"/>[s][d]'s
    /// old state (its old replica in that stage; -1: nothing, a spare or a worker moved from another stage, whose state
    /// TrainingRun drops since the fingerprint names the stage). Every new rank runs Resumption.Restore at once.
    /// </summary>
    Restored[] Reform(Whole live, int[][] members)
    {
        var job = live.Case;
        var old = Enumerable.Range(0, Pp).Select(s => Enumerable.Range(0, job.OldDp).Select(d => live.Replica(s, d)).ToArray()).ToArray();
        var handed = new HashSet<ReplicaState>();
        var restored = Array.Empty<Restored>();
        try
        {
            for (int s = 0; s < Pp; s++)
            {
                var stage = old[s];
                TcpRanks.Run(job.OldDp, c => LiveShards.Refresh(c, stage[c.Rank]));
                Assert.All(stage, r => Assert.Equal(LiveStep, r.Neighbour!.Step));
            }
            var layout = job.Layout(job.NewDp);
            restored = PipelineGroup.Run(job.NewDp, Pp, rank =>
            {
                var holder = new ReplicaHolder();
                if (members[rank.Stage][rank.Replica] is >= 0 and var d)
                {
                    holder.State = old[rank.Stage][d];
                    lock (handed) handed.Add(holder.State);
                }
                var assignment = new Assignment
                {
                    JobId = Job, Generation = 2, Rank = layout.Rank(rank.Stage, rank.Replica), World = layout.WorldSize,
                    DpRank = rank.Replica, DpSize = job.NewDp, PpStage = rank.Stage, PpSize = Pp, ResumeStep = CommittedStep,
                };
                var settings = new WorkerSettings
                {
                    Coordinator = new Uri("http://127.0.0.1:1"), DataShards = new Uri("http://127.0.0.1:1"), Checkpoints = new Uri(host.Address),
                    Token = "t", WorkerId = $"worker-{rank.Stage}-{rank.Replica}",
                };
                var log = new StringWriter();
                using var cancel = new RunCancellation();
                var run = new RunContext(assignment, settings, _ => { }, log, null, cancel, holder);
                var store = new GrpcCheckpointStore(host.Client, host.Address, Job, Path.Combine(staging, settings.WorkerId));
                var resumption = new Resumption(run, job.PlanOf(rank.Stage), CPU, layout, store, TokenizerHash, CancellationToken.None);
                var (plan, _) = resumption.Restore(rank.StageGroup!, rank.Links);
                return new Restored(rank.Stage, rank.Replica, plan, log.ToString(), holder.State!);
            }, limit: TimeSpan.FromSeconds(150), job: Job, generation: 2);
            foreach (var r in restored) output.WriteLine($"--- stage {r.Stage} replica {r.Replica}: {r.Plan.Source} at step {r.Plan.Step}\n{r.Log}");
            return restored;
        }
        catch
        {
            foreach (var r in restored) r.State.Dispose();
            throw;
        }
        finally
        {
            // A state handed to a rank is the rank's now (kept in its new state, or dropped by the load); the others are ours.
            foreach (var s in old.SelectMany(s => s).Where(s => !handed.Contains(s))) s.Dispose();
        }
    }

    /// <summary>Commits <paramref name="state"/> as step 3 of the job (saved as one process; a stage reads its tensors and rows of it).</summary>
    async Task Commit(Whole state)
    {
        var store = new GrpcCheckpointStore(host.Client, host.Address, Job, staging);
        var job = state.Case;
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(1, 1, job.Config.NumHiddenLayers), [.. state.Tensors],
            new CheckpointPosition(CommittedStep, 1, CommittedStep * job.Spec.GlobalBatch, CommittedStep), job.Config.ToJson(), TokenizerHash);
    }

    /// <summary>Every rank holds, bit for bit, <paramref name="expected"/>'s weights of its stage and its new ZeRO rows of both moments, at <paramref name="step"/>.</summary>
    static void AssertHolds(Whole expected, Restored[] ranks, long step, long optimizerSteps)
    {
        foreach (var r in ranks)
        {
            string who = $"stage {r.Stage} replica {r.Replica}";
            Assert.True((r.State.Step, r.State.Optimizer.StepCount) == (step, optimizerSteps),
                $"{who} holds step {r.State.Step} (optimizer step {r.State.Optimizer.StepCount}); expected {step} ({optimizerSteps})");
            int newDp = expected.Case.NewDp;
            Assert.Equal((r.Replica, newDp), (r.State.ZeroShard, r.State.ZeroShards));
            int weights = 0, state = 0;
            string[] kinds = expected.Case.Bf16 ? ["exp_avg", "exp_avg_sq", "master"] : ["exp_avg", "exp_avg_sq"];
            foreach (var (name, t) in r.State.Stage!.StageTensors(r.State.Optimizer))
            {
                var whole = expected.Tensors[name];
                var slot = name.StartsWith("optimizer.", StringComparison.Ordinal) ? r.State.Optimizer.Slots.Single(s => kinds.Any(k => name == $"optimizer.{s.Name}.{k}")) : null;
                using var rows = slot is { RowCount: { } n } && whole.dim() > 0 ? whole.narrow(0, slot.RowStart, n) : whole.alias();
                Assert.True(LiveShardsReshardTests.Same(rows, t), $"{who}: '{name}'{(slot is null ? "" : $" rows [{slot.RowStart}, +{slot.RowCount})")} differ from the expected state's");
                if (slot is null) weights++; else state++;
            }
            Assert.True(weights > 0 && state == kinds.Length * r.State.Stage.Parameters.Count, $"{who}: {weights} weights and {state} optimizer tensors compared");
            // bf16: the weights the next step computes with are the master rows rounded, as AdamW's update writes them.
            foreach (var s in r.State.Optimizer.Slots.Where(s => s.Master is not null))
            {
                using var own = s.Own(s.Param);
                using var rounded = s.Master!.to(own.dtype);
                Assert.True(LiveShardsReshardTests.Same(rounded, own.reshape(rounded.shape)), $"{who}: {s.Name}'s weights are not its master rows rounded");
            }
            // The next step's redundancy: the neighbour's new rows are copied at the step resumed from.
            Assert.Equal(((r.Replica + 1) % newDp, step), (r.State.Neighbour!.Shard, r.State.Neighbour.Step));
        }
    }

    /// <summary>
    /// Old ranks 4 and 5 (stage 1's replicas 1 and 2) are lost. Stage 0 keeps old replicas 0 and 1, which cover all three of
    /// its shards (replica 2's from replica 1's copy); stage 1 keeps old replica 0 (its shard, and shard 1 from its copy)
    /// beside a worker that holds nothing of stage 1, so stage 1's shard 2 — held by replica 2 and copied by replica 1 — is
    /// held by no one. "All or none": stage 0 must not go on live from step 5 while stage 1 reloads step 3, so every rank
    /// of both stages loads the committed checkpoint, and each one's log says why.
    /// </summary>
    [Fact]
    public async Task AStageCoveredBesideAStageThatIsNotMakesEveryStageLoadTheCheckpointAndEachLogSaysWhy()
    {
        using var live = new Whole(seed: 1, JobCase.Zero1Dp3ToDp2);
        using var committed = new Whole(seed: 2, JobCase.Zero1Dp3ToDp2);
        await Commit(committed);

        var ranks = Reform(live, [[0, 1], [0, -1]]);
        try
        {
            Assert.All(ranks, r => Assert.True((r.Plan.Source, r.Plan.Step) == (ResumePlan.Checkpoint, CommittedStep),
                $"stage {r.Stage} replica {r.Replica} resumes from {r.Plan.Source} at step {r.Plan.Step}; expected the checkpoint of step {CommittedStep}"));
            const string loads = "every rank loads the committed checkpoint of step 3";
            foreach (var r in ranks.Where(r => r.Stage == 1))
                Assert.Contains($"stage 1 rank {2 + r.Replica} cannot resume from live state at step 5: shard 2 of 3 at step 5 is held by no survivor " +
                                $"(its rank and the neighbour keeping its copy are both gone); {loads}", r.Log);
            foreach (var r in ranks.Where(r => r.Stage == 0))
                Assert.Contains($"stage 0 rank {r.Replica} cannot resume from live state at step 5: stage 0 is covered, but the stages' covers are of steps 5, -1 " +
                                $"(-1: none) or another history; {loads}", r.Log);
            Assert.All(ranks, r => Assert.Contains($"stage {r.Stage} resumed from committed step 3", r.Log));
            Assert.All(ranks, r => Assert.DoesNotContain("from the live shards", r.Log));
            AssertHolds(committed, ranks, CommittedStep, CommittedStep);
        }
        finally { foreach (var r in ranks) r.State.Dispose(); }
    }

    /// <summary>
    /// Old rank 4 (stage 1, replica 1) is lost and pp 2 x dp 3 shrinks onto dp 2 with the members the Coordinator keeps
    /// (LiveMembers.ByStage): stage 0 old replicas 0 and 1, stage 1 old replicas 0 and 2. Each stage is covered at step 5
    /// (stage 0's shard 2 from replica 1's copy, stage 1's lost shard 1 from replica 0's), the stages agree, and every rank
    /// reshards live: no step redone, each rank's rows the live state's bit for bit.
    /// </summary>
    [Fact]
    public async Task ADp3PipelineShrinkingOntoDp2WithTheStagesCoveredReshardsEveryStageLive()
    {
        using var live = new Whole(seed: 1, JobCase.Zero1Dp3ToDp2);
        using var committed = new Whole(seed: 2, JobCase.Zero1Dp3ToDp2);
        await Commit(committed); // there to fall back to: the stages must choose the live shards over it
        var ranks = Reform(live, [[0, 1], [0, 2]]);
        try
        {
            Assert.All(ranks, r => Assert.True((r.Plan.Source, r.Plan.Step) == (ResumePlan.Shards, LiveStep),
                $"stage {r.Stage} replica {r.Replica} resumes from {r.Plan.Source} at step {r.Plan.Step}; expected the live shards of step {LiveStep}"));
            foreach (var r in ranks)
            {
                Assert.Contains($"stage {r.Stage} resuming at step 5 from the live shards of the survivors: 3 shard(s) resharded onto dp 2", r.Log);
                Assert.Contains(r.Stage == 0 ? "2 from rank 1's copy" : "1 from rank 0's copy", r.Log);
                Assert.DoesNotContain("cannot resume", r.Log);
            }
            AssertHolds(live, ranks, LiveStep, LiveOptimizerSteps);
        }
        finally { foreach (var r in ranks) r.State.Dispose(); }
    }

    /// <summary>
    /// pp 2 x dp 2 x ep 2 x zero 2 in bf16: stage 1's replica 1 (expert shard 1, its experts and its ZeRO rows held by it
    /// alone) is lost and a spare takes its place. Stage 0 holds its own state in place; stage 1's survivor holds the lost
    /// rank's pieces in its copy, so both stages resume live at step 5: the spare builds its model from the seed in bf16
    /// (Resumption.NewState), takes the stage's weights and routing biases from the survivor and the lost rank's expert
    /// weights, moments and fp32 master rows from the copy, bit for bit, its weights the masters rounded.
    /// </summary>
    [Fact]
    public async Task ABf16Ep2Zero2PipelineResumesLiveWithASpareHoldingTheLostRanksExpertsAndMasterRows()
    {
        var job = JobCase.Ep2Zero2Bf16;
        using var live = new Whole(seed: 1, job);
        using var committed = new Whole(seed: 2, job);
        await Commit(committed); // there to fall back to: the stages must choose the live shards over it
        var ranks = Reform(live, [[0, 1], [0, -1]]);
        try
        {
            Assert.All(ranks, r => Assert.True((r.Plan.Source, r.Plan.Step) == (ResumePlan.Shards, LiveStep),
                $"stage {r.Stage} replica {r.Replica} resumes from {r.Plan.Source} at step {r.Plan.Step}; expected the live shards of step {LiveStep}"));
            foreach (var r in ranks)
            {
                Assert.Contains($"stage {r.Stage} resuming at step 5 from the live shards of the survivors: 2 shard(s) (ep 2) resharded onto dp 2", r.Log);
                Assert.DoesNotContain("cannot resume", r.Log);
            }
            // Stage 1's pieces of the lost rank (its ZeRO rows and its expert shard) come from its survivor's copy.
            Assert.All(ranks.Where(r => r.Stage == 1), r => Assert.Contains("(shard 1 from rank 0's copy, expert shard 1 part 0 of 1 from rank 0's copy)", r.Log));
            Assert.Contains(CheckpointTensors.Collect(ranks.Single(r => (r.Stage, r.Replica) == (1, 1)).State.Model, null),
                            kv => kv.Key.Contains(".mlp.experts.4.", StringComparison.Ordinal));
            AssertHolds(live, ranks, LiveStep, LiveOptimizerSteps);
        }
        finally { foreach (var r in ranks) r.State.Dispose(); }
    }
}
