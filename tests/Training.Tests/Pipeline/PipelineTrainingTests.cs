// Pipeline-parallel training over real loopback links gives the single-process trainer's losses and weights (float64, MoE and MTP on).
using DeepSeekCluster.Training.Parallel;
using System.Diagnostics;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tests.Collectives;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Pipeline;

public class PipelineTrainingTests(ITestOutputHelper output)
{
    // 4 decoder layers (1 dense, 3 MoE) and one MoE MTP module: pp = 2 splits 2 + 2, pp = 3 splits 2 + 1 + 1. The
    // sequence balance loss is on so that every stage's MoE layers add an auxiliary term to its backward.
    static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab, layers: 4);

    // Global batch 8 = 1 x 4 x 2 = 2 x 2 x 2 (replicas x micro-batches x micro-batch). A clip of 0.5 is active in every
    // step here, so the global norm over the stages decides every update.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    const double Tolerance = 1e-9;

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed); // every rank starts from the single process's weights
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(ScalarType.Float64);
        return model;
    }

    /// <summary>Parameters and routing biases under HF names, as float64 arrays.</summary>
    static Dictionary<string, double[]> Snapshot(DeepSeekForCausalLM model, Func<string, bool> keep)
    {
        var result = new Dictionary<string, double[]>();
        foreach (var (name, p) in model.named_parameters())
            if (keep(model.ToHfName(name))) result[model.ToHfName(name)] = p.detach().cpu().data<double>().ToArray();
        foreach (var (name, b) in model.named_buffers())
            if (name.EndsWith("e_score_correction_bias", StringComparison.Ordinal) && keep(model.ToHfName(name)))
                result[model.ToHfName(name)] = b.cpu().to_type(ScalarType.Float64).data<double>().ToArray();
        return result;
    }

    sealed record RankResult(int Stage, int Replica, List<StepMetrics> Steps, Dictionary<string, double[]> Owned, double Evaluation);

    RankResult[] RunPipeline(int dp, int pp, string schedule, string recompute = "none")
    {
        var options = Options with { PipelineSchedule = schedule, Recompute = recompute };
        var layout = ParallelLayout.Even(dp, pp, Micro(Data.Value.Vocab).NumHiddenLayers);
        var plan = new ShardingPlan(layout, []);
        var models = new DeepSeekForCausalLM[dp * pp];
        for (int i = 0; i < models.Length; i++) models[i] = NewModel(); // built in turn: the seed is global
        var results = PipelineGroup.Run(dp, pp, rank =>
        {
            var model = models[layout.Rank(rank.Stage, rank.Replica)];
            var stage = new PipelineStage(model, layout, rank.Stage);
            var reducer = rank.StageGroup is { } g ? new BucketedGradientReducer(g, bucketBytes: 16 << 10) : null;
            using var trainer = new PipelineTrainer(stage, new PermutedSamples(Data.Value.Train, (ulong)Options.Seed), options, CPU, 1e11,
                                                    rank.Links, rank.Replica, dp, reducer);
            var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
            double evaluation = trainer.Evaluate(new PermutedSamples(Data.Value.Train, 7), EvalBatches);
            return new RankResult(rank.Stage, rank.Replica, steps, Snapshot(model, n => plan.StageOf(n) == rank.Stage), evaluation);
        });
        foreach (var m in models) m.Dispose();
        return results;
    }

    const int EvalBatches = 3;

    (List<StepMetrics> Steps, Dictionary<string, double[]> Weights, double Evaluation) RunSingle()
    {
        using var model = NewModel();
        using var trainer = new Trainer(model, Data.Value.Train, null, Options, CPU, peakFlops: 1e11);
        var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        double evaluation = trainer.Evaluate(new PermutedSamples(Data.Value.Train, 7), EvalBatches);
        return (steps, Snapshot(model, _ => true), evaluation);
    }

    static double MaxDifference(double[] a, double[] b)
    {
        Assert.Equal(a.Length, b.Length);
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        return max;
    }

    void AssertMatchesSingleProcess(RankResult[] ranks, int dp)
    {
        var (single, weights, evaluation) = RunSingle();
        for (int s = 0; s < Options.Steps; s++)
        {
            // Every stage of every replica reports the same losses: those of the whole global batch (the last stages average
            // theirs over the replicas, the exchange along the pipeline hands them to the other stages).
            Assert.All(ranks, r => Assert.Equal(ranks[0].Steps[s].Loss, r.Steps[s].Loss));
            Assert.All(ranks, r => Assert.Equal(ranks[0].Steps[s].MtpLoss, r.Steps[s].MtpLoss));
            Assert.All(ranks, r => Assert.Equal(ranks[0].Steps[s].AuxLoss, r.Steps[s].AuxLoss));
            double loss = ranks[0].Steps[s].Loss, mtp = ranks[0].Steps[s].MtpLoss!.Value;
            double aux = ranks[0].Steps[s].AuxLoss!.Value; // every stage's MoE layers contribute
            output.WriteLine($"step {s + 1}: loss {loss:R} (single {single[s].Loss:R}), mtp {mtp:R}, aux {aux:R} (single {single[s].AuxLoss:R}), grad norm {ranks[0].Steps[s].GradNorm:R} (single {single[s].GradNorm:R})");
            Assert.True(Math.Abs(loss - single[s].Loss) <= Tolerance * single[s].Loss, $"step {s + 1}: pipeline loss {loss:R}, single process {single[s].Loss:R}");
            Assert.True(Math.Abs(mtp - single[s].MtpLoss!.Value) <= Tolerance * single[s].MtpLoss!.Value, $"step {s + 1}: pipeline MTP loss {mtp:R}, single process {single[s].MtpLoss:R}");
            Assert.True(Math.Abs(aux - single[s].AuxLoss!.Value) <= Tolerance * single[s].AuxLoss!.Value, $"step {s + 1}: pipeline aux loss {aux:R}, single process {single[s].AuxLoss:R}");
            Assert.True(single[s].GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {single[s].GradNorm})");
            Assert.All(ranks, r => Assert.True(Math.Abs(r.Steps[s].GradNorm - single[s].GradNorm) <= Tolerance * single[s].GradNorm,
                $"step {s + 1}: stage {r.Stage} replica {r.Replica} clipped with norm {r.Steps[s].GradNorm:R}, the single process {single[s].GradNorm:R}"));
            // The expert loads of every MoE layer (3 decoder layers and the MTP module) reach every stage.
            if (dp == 1)
                Assert.All(ranks, r => Assert.Equal(single[s].ExpertLoad.Select(l => string.Join(",", l)), r.Steps[s].ExpertLoad.Select(l => string.Join(",", l))));
        }

        // Every tensor of the single-process model is owned by exactly one stage, and every replica of it holds the same values.
        foreach (var (name, expected) in weights)
        {
            var holders = ranks.Where(r => r.Owned.ContainsKey(name)).ToList();
            Assert.True(holders.Count == dp && holders.Select(h => h.Stage).Distinct().Count() == 1, $"'{name}' is held by {holders.Count} ranks of stages {string.Join(",", holders.Select(h => h.Stage))}");
            foreach (var h in holders)
            {
                double diff = MaxDifference(expected, h.Owned[name]);
                Assert.True(diff <= Tolerance, $"'{name}' on stage {h.Stage} replica {h.Replica} differs from the single process by {diff:E2}");
            }
        }
        Assert.Equal(weights.Count, ranks.Where(r => r.Replica == 0).Sum(r => r.Owned.Count));

        // Evaluation through the stages (forwards only) gives the trained single process's loss on every rank.
        output.WriteLine($"evaluation: pipeline {ranks[0].Evaluation:R}, single {evaluation:R}");
        Assert.All(ranks, r => Assert.True(Math.Abs(r.Evaluation - evaluation) <= Tolerance * evaluation,
            $"stage {r.Stage} replica {r.Replica} evaluates {r.Evaluation:R}, the single process {evaluation:R}"));
    }

    // Both schedules run the backwards in micro-batch order, so both must equal the single process to float64 rounding.
    [Theory]
    [InlineData(2, "1f1b")]
    [InlineData(2, "gpipe")]
    [InlineData(3, "1f1b")] // a middle stage passes the MTP embeddings and their gradient through
    [InlineData(3, "gpipe")]
    public void StagesAsThreadsGiveTheSingleProcessLossesAndWeights(int pp, string schedule)
    {
        var clock = Stopwatch.StartNew();
        var ranks = RunPipeline(dp: 1, pp, schedule);
        output.WriteLine($"pp={pp} {schedule}: {clock.Elapsed.TotalSeconds:F1} s for {Options.Steps} steps");
        AssertMatchesSingleProcess(ranks, dp: 1);
    }

    // Stages that recompute their layers (and, on the last, the MTP block) still equal the plain single process.
    [Theory]
    [InlineData("full")]
    [InlineData("selective")]
    public void StagesThatRecomputeGiveTheSingleProcessLossesAndWeights(string recompute)
    {
        long before = ActivationRecompute.Recomputed;
        AssertMatchesSingleProcess(RunPipeline(dp: 1, pp: 2, "1f1b", recompute), dp: 1);
        Assert.True(ActivationRecompute.Recomputed > before, "the stages should have recomputed");
    }

    [Theory]
    [InlineData("1f1b")]
    [InlineData("gpipe")]
    public void TheTinyPresetInFloat32OnTwoStagesFollowsTheSingleProcessLossCurve(string schedule)
    {
        // The shipped preset at its own precision: float32 sums in another order, so the curves agree to float tolerance.
        var config = DeepSeekConfig.Tiny(Data.Value.Vocab);
        var options = Options with { SeqLen = 16, GlobalBatch = 16, MicroBatch = 4, Steps = 4, ClipNorm = 1.0, PipelineSchedule = schedule };
        DeepSeekForCausalLM Fresh() { manual_seed(options.Seed); return new DeepSeekForCausalLM(config).InitializeWeights(); }

        List<(double Loss, double Seconds)> Single()
        {
            var steps = new List<(double Loss, double Seconds)>();
            using var model = Fresh();
            using var trainer = new Trainer(model, Data.Value.Train, null, options, CPU, peakFlops: 1e11);
            for (int s = 0; s < options.Steps; s++)
            {
                var clock = Stopwatch.StartNew();
                double loss = trainer.TrainStep().Loss;
                steps.Add((loss, clock.Elapsed.TotalSeconds));
            }
            return steps;
        }
        // On a thread of its own like each stage: on the test runner's thread the same steps ran 10x slower here (torch threading per calling thread).
        List<(double Loss, double Seconds)> OnOwnThread() =>
            Task.Factory.StartNew(Single, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).GetAwaiter().GetResult();
        var onRunnerThread = Single();
        var single = OnOwnThread();

        var layout = ParallelLayout.Even(1, 2, config.NumHiddenLayers);
        var models = new[] { Fresh(), Fresh() };
        var stages = PipelineGroup.Run(1, 2, rank =>
        {
            using var trainer = new PipelineTrainer(new PipelineStage(models[rank.Stage], layout, rank.Stage),
                new PermutedSamples(Data.Value.Train, (ulong)options.Seed), options, CPU, 1e11, rank.Links);
            var steps = new List<(double Loss, double Seconds)>();
            for (int s = 0; s < options.Steps; s++)
            {
                var clock = Stopwatch.StartNew();
                double loss = trainer.TrainStep().Loss;
                steps.Add((loss, clock.Elapsed.TotalSeconds));
            }
            return steps;
        });
        foreach (var m in models) m.Dispose();
        var singleAgain = OnOwnThread(); // after the pipeline too, so that neither side alone pays the process's warm-up

        // The fastest step after the first, for the report (the least disturbed by other load); nothing is asserted on time.
        output.WriteLine($"tiny float32, seq 16, batch 16 = 4 x 4, {schedule}: step {onRunnerThread.Skip(1).Min(x => x.Seconds):F3} s on the runner's thread, {single.Skip(1).Min(x => x.Seconds):F3} s then " +
                         $"{singleAgain.Skip(1).Min(x => x.Seconds):F3} s on one process, {stages[0].Skip(1).Min(x => x.Seconds):F3} s with 2 stages as threads");
        for (int s = 0; s < options.Steps; s++)
        {
            output.WriteLine($"step {s + 1}: single {single[s].Loss:R}, pipeline {stages[0][s].Loss:R}");
            Assert.Equal(single[s].Loss, singleAgain[s].Loss);
            Assert.Equal(stages[0][s].Loss, stages[1][s].Loss);
            Assert.True(Math.Abs(stages[0][s].Loss - single[s].Loss) <= 1e-4 * single[s].Loss, $"step {s + 1}: pipeline {stages[0][s].Loss}, single {single[s].Loss}");
        }
    }

    [Theory]
    [InlineData("1f1b")]
    [InlineData("gpipe")]
    public void TwoReplicasOfTwoStagesGiveTheSingleProcessLossesAndWeights(string schedule)
    {
        var ranks = RunPipeline(dp: 2, pp: 2, schedule);
        AssertMatchesSingleProcess(ranks, dp: 2);
    }

    [Fact]
    public void OneF1BHoldsAtMostPpMinusSMicroBatchesOnStageSWhereGPipeHoldsThemAll()
    {
        // pp 3 and 6 micro-batches per step: 1F1B's warm-up is pp - s - 1 forwards, so stage s holds pp - s at once.
        var options = Options with { GlobalBatch = 12, MicroBatch = 2, Steps = 2 };
        var layout = ParallelLayout.Even(1, 3, Micro(Data.Value.Vocab).NumHiddenLayers);
        (int[] Peaks, long[] Bytes, double[] Losses) Run(string schedule)
        {
            var models = Enumerable.Range(0, 3).Select(_ => NewModel()).ToArray();
            var stages = PipelineGroup.Run(1, 3, rank =>
            {
                using var trainer = new PipelineTrainer(new PipelineStage(models[rank.Stage], layout, rank.Stage),
                    new PermutedSamples(Data.Value.Train, (ulong)options.Seed), options with { PipelineSchedule = schedule }, CPU, 1e11, rank.Links)
                { MeasureHeldBytes = true };
                var steps = new List<(int Peak, long Bytes, double Loss)>();
                for (int s = 0; s < options.Steps; s++)
                {
                    double loss = trainer.TrainStep().Loss;
                    steps.Add((trainer.PeakHeldMicroBatches, trainer.PeakHeldTensorBytes, loss));
                }
                return steps;
            });
            foreach (var m in models) m.Dispose();
            // The peak is per step: the second step's equals the first's.
            Assert.All(stages, s => Assert.Equal(s[0].Peak, s[1].Peak));
            output.WriteLine($"{schedule}: peak micro-batches held per stage {string.Join(", ", stages.Select(s => s[1].Peak))}, " +
                             $"their tensors' bytes {string.Join(", ", stages.Select(s => s[1].Bytes))}; losses {string.Join(", ", stages[0].Select(s => s.Loss.ToString("R")))}");
            return (stages.Select(s => s[1].Peak).ToArray(), stages.Select(s => s[1].Bytes).ToArray(), stages[0].Select(s => s.Loss).ToArray());
        }

        var oneF1B = Run("1f1b");
        var gpipe = Run("gpipe");
        Assert.Equal([3, 2, 1], oneF1B.Peaks);
        Assert.Equal([6, 6, 6], gpipe.Peaks);
        // The bytes follow the counts (measured: 1F1B's are exactly (pp - s)/6 of GPipe's; not asserted, as a MoE
        // layer's tensors may differ in size between micro-batches).
        for (int s = 0; s < 3; s++)
            Assert.True(gpipe.Bytes[s] > 0 && oneF1B.Bytes[s] < gpipe.Bytes[s], $"stage {s}: 1F1B held {oneF1B.Bytes[s]} bytes, GPipe {gpipe.Bytes[s]}");
        // The same micro-batches, the same backwards in the same order: the same losses.
        for (int s = 0; s < options.Steps; s++)
            Assert.True(Math.Abs(oneF1B.Losses[s] - gpipe.Losses[s]) <= Tolerance * gpipe.Losses[s], $"step {s + 1}: 1F1B {oneF1B.Losses[s]:R}, GPipe {gpipe.Losses[s]:R}");
    }

    [Fact]
    public void OneF1BWithFramesFarLargerThanTheSocketBuffersCompletesAndMatchesTheSingleProcess()
    {
        // In 1F1B's steady phase stage 0 sends micro-batch i + 1's hidden states and embeddings (2 x 512 KiB here) while
        // stage 1 sends micro-batch i's two gradients back. The socket buffers are cut to 64 KiB (the kernel doubles it;
        // about 256 KiB in flight each way on loopback), so two plain blocking sends would each wait for the other end to
        // read. With the links' default 4 MiB buffers the same happens above ~16 MiB per exchange (a bf16 micro-batch of
        // 4 x 4096 x 7168 is 235 MiB). Checked: with StageLink.SendAndReceive changed to send, then receive, on the
        // calling thread, this test fails after 60 s with PeerStalled ("sent or accepted nothing within 60 s (could not
        // send to pipeline stage 1 ...)") on both stages instead of completing.
        var config = Micro(Data.Value.Vocab) with { HiddenSize = 512 };
        var options = Options with { GlobalBatch = 32, MicroBatch = 8, Steps = 2 }; // 4 micro-batches of 8 x 16 x 512 float64
        DeepSeekForCausalLM Fresh()
        {
            manual_seed(options.Seed);
            var model = new DeepSeekForCausalLM(config).InitializeWeights();
            model.to(ScalarType.Float64);
            return model;
        }
        var layout = ParallelLayout.Even(1, 2, config.NumHiddenLayers);
        var models = new[] { Fresh(), Fresh() };
        var stages = PipelineGroup.Run(1, 2, rank =>
        {
            foreach (var link in new[] { rank.Links.Previous, rank.Links.Next }) link?.LimitBuffers(64 << 10);
            using var trainer = new PipelineTrainer(new PipelineStage(models[rank.Stage], layout, rank.Stage),
                new PermutedSamples(Data.Value.Train, (ulong)options.Seed), options, CPU, 1e11, rank.Links);
            var losses = Enumerable.Range(0, (int)options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();
            return (Losses: losses, rank.Links.BytesMoved);
        }, timeout: TimeSpan.FromSeconds(60));
        foreach (var m in models) m.Dispose();

        using var single = Fresh();
        using var reference = new Trainer(single, Data.Value.Train, null, options, CPU, peakFlops: 1e11);
        for (int s = 0; s < options.Steps; s++)
        {
            double expected = reference.TrainStep().Loss;
            output.WriteLine($"step {s + 1}: pipeline {stages[0].Losses[s]:R}, single {expected:R}");
            Assert.Equal(stages[0].Losses[s], stages[1].Losses[s]);
            Assert.True(Math.Abs(stages[0].Losses[s] - expected) <= Tolerance * expected, $"step {s + 1}: pipeline {stages[0].Losses[s]:R}, single {expected:R}");
        }
        // Every micro-batch's two frames went down and its two gradients came back: 4 frames of 512 KiB each, per step.
        long frame = 8L * 16 * 512 * sizeof(double);
        Assert.True(stages[0].BytesMoved >= options.Steps * 4 * 4 * frame, $"stage 0 moved {stages[0].BytesMoved} bytes");
    }

    [Fact]
    public void AbortingTheLinksEndsAnExchangeBlockedOnASilentNeighbourAtOnce()
    {
        using var aborted = new ManualResetEventSlim();
        var outcomes = PipelineGroup.Run(1, 2, rank =>
        {
            if (rank.Stage == 1)
            {
                // Alive but silent: reads nothing and sends nothing until stage 0's exchange has ended.
                Assert.True(aborted.Wait(TimeSpan.FromSeconds(120)), "stage 0's exchange never ended");
                return ((Exception?)null, 0.0);
            }
            rank.Links.Next!.LimitBuffers(64 << 10);
            using var big = zeros([4 << 20], dtype: ScalarType.Float32); // 16 MiB: the send blocks on the full buffers
            var clock = Stopwatch.StartNew();
            // The run's abort (a cancel) disposes the links from another thread once the exchange is under way.
            var abort = Task.Run(() =>
            {
                Assert.True(SpinWait.SpinUntil(() => rank.Links.Next!.SendInFlight, TimeSpan.FromSeconds(60)),
                    "the exchange never started sending");
                rank.Links.Dispose();
            });
            try
            {
                rank.Links.Next!.SendAndReceive([big], 1, [4 << 20], ScalarType.Float32, CPU);
                return (null, clock.Elapsed.TotalSeconds);
            }
            catch (Exception e) { return (e, clock.Elapsed.TotalSeconds); }
            finally { abort.Wait(); aborted.Set(); }
        }, timeout: TimeSpan.FromSeconds(60));

        var (error, seconds) = outcomes[0];
        var failure = Assert.IsType<CollectiveException>(error);
        Assert.Equal(CollectiveFailure.Unavailable, failure.Failure);
        Assert.Contains("aborted", failure.Message);
        Assert.Contains("pipeline stage 1 (replica 0, 127.0.0.1:", failure.Message);
        Assert.True(seconds < 30, $"the exchange ended {seconds:F1} s after it began, not at the abort (the link timeout is 60 s)");
    }

    [Fact]
    public void AnUnknownPipelineScheduleIsRefusedNamingTheOptionAndTheAcceptedValues()
    {
        var error = Assert.Throws<ArgumentException>(() => (Options with { PipelineSchedule = "interleaved" }).Validated());
        Assert.Contains("pipeline_schedule must be one of 1f1b, gpipe, got 'interleaved'", error.Message);
    }

    [Fact]
    public async Task EachStageSavesOnlyItsTensorsAndTheCheckpointLoadsIntoOneProcessAsTheSingleProcessState()
    {
        const string job = "pp-ckpt";
        string root = Path.Combine(Path.GetTempPath(), $"pp-ckpt-{Guid.NewGuid():N}");
        try
        {
            using var store = new FolderCheckpointStore(root, job);
            var layout = ParallelLayout.Even(1, 2, Micro(Data.Value.Vocab).NumHiddenLayers);
            var models = new[] { NewModel(), NewModel() };
            var saved = PipelineGroup.Run(1, 2, rank =>
            {
                var stage = new PipelineStage(models[rank.Stage], layout, rank.Stage);
                using var trainer = new PipelineTrainer(stage, new PermutedSamples(Data.Value.Train, (ulong)Options.Seed), Options, CPU, 1e11, rank.Links);
                for (int s = 0; s < Options.Steps; s++) trainer.TrainStep();
                var plan = new ShardingPlan(layout, stage.CheckpointCatalog);
                int fileRank = layout.Rank(rank.Stage, 0);
                var file = ShardedCheckpointWriter.WriteRank(store, plan, fileRank, Options.Steps, stage.StageTensors(trainer.Optimizer));
                return (File: file, Plan: plan, Written: plan.WritesOf(fileRank).Select(w => w.Name).ToList(), Stage: rank.Stage);
            });
            foreach (var m in models) m.Dispose();

            // Both stages catalogue the whole model; each writes exactly the tensors its stage owns, and together all of them.
            Assert.Equal(saved[0].Plan.Tensors.Select(t => $"{t.Name}:{string.Join("x", t.Shape)}"), saved[1].Plan.Tensors.Select(t => $"{t.Name}:{string.Join("x", t.Shape)}"));
            foreach (var r in saved) Assert.All(r.Written, name => Assert.Equal(r.Stage, r.Plan.StageOf(name)));
            Assert.Empty(saved[0].Written.Intersect(saved[1].Written));
            Assert.Equal(saved[0].Plan.Tensors.Select(t => t.Name).Order(), saved.SelectMany(r => r.Written).Order());
            Assert.Contains("model.embed_tokens.weight", saved[0].Written);
            Assert.Contains("optimizer.lm_head.weight.exp_avg", saved[1].Written);

            var manifest = ShardedCheckpointWriter.Manifest(job, saved[0].Plan,
                new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps), saved.Select(r => r.File), Micro(Data.Value.Vocab).ToJson(), null);
            await store.CommitAsync(manifest);

            // The single process trained the same steps; a whole model loaded from the two stage files must equal it.
            using var single = NewModel();
            using var trainer = new Trainer(single, Data.Value.Train, null, Options, CPU, peakFlops: 1e11);
            for (int s = 0; s < Options.Steps; s++) trainer.TrainStep();
            using var loaded = NewModel();
            using var optimizer = Trainer.CreateOptimizer(loaded, Options);
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, loaded, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            var expected = CheckpointTensors.Collect(single, trainer.Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().to_type(ScalarType.Float64).data<double>().ToArray());
            var actual = CheckpointTensors.Collect(loaded, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.detach().to_type(ScalarType.Float64).data<double>().ToArray());
            Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
            foreach (var (name, values) in expected)
            {
                double diff = MaxDifference(values, actual[name]);
                Assert.True(diff <= Tolerance, $"'{name}' loaded from the stage files differs from the single process by {diff:E2}");
            }
        }
        finally
        {
            if (Directory.Exists(root)) Directory.Delete(root, recursive: true);
        }
    }

    [Fact]
    public void AStageWhoseNeighbourClosesItsLinkFailsNamingThatStage()
    {
        var layout = ParallelLayout.Even(1, 2, Micro(Data.Value.Vocab).NumHiddenLayers);
        using var model = NewModel();
        var outcomes = PipelineGroup.Run(1, 2, rank =>
        {
            if (rank.Stage == 1)
            {
                rank.Links.Dispose(); // the process of stage 1 dies: its sockets close
                return ((Exception?)null, 0.0);
            }
            var clock = Stopwatch.StartNew();
            using var trainer = new PipelineTrainer(new PipelineStage(model, layout, 0), new PermutedSamples(Data.Value.Train, 1), Options, CPU, 1e11, rank.Links);
            try { trainer.TrainStep(); return (null, clock.Elapsed.TotalSeconds); }
            catch (Exception e) { return (e, clock.Elapsed.TotalSeconds); }
        }, timeout: TimeSpan.FromSeconds(20));

        var (error, seconds) = outcomes[0];
        var failure = Assert.IsType<CollectiveException>(error);
        Assert.Equal(CollectiveFailure.PeerLost, failure.Failure);
        Assert.Equal(1, failure.PeerRank);
        Assert.Contains("pipeline stage 1 (replica 0, 127.0.0.1:", failure.Message);
        Assert.True(seconds < 20, $"stage 0 noticed after {seconds:F1} s, not before its 20 s timeout");
    }

    [Fact]
    public void AStageWhoseNeighbourStallsFailsWithinTheTimeoutNamingThatStage()
    {
        var layout = ParallelLayout.Even(1, 2, Micro(Data.Value.Vocab).NumHiddenLayers);
        using var model = NewModel();
        using var stageZeroDone = new ManualResetEventSlim();
        var outcomes = PipelineGroup.Run(1, 2, rank =>
        {
            if (rank.Stage == 1)
            {
                // Alive but silent (a hung process): its links stay open until stage 0 has given up.
                Assert.True(stageZeroDone.Wait(TimeSpan.FromSeconds(120)), "stage 0 never gave up");
                return ((Exception?)null, 0.0);
            }
            var clock = Stopwatch.StartNew();
            try
            {
                using var trainer = new PipelineTrainer(new PipelineStage(model, layout, 0), new PermutedSamples(Data.Value.Train, 1), Options, CPU, 1e11, rank.Links);
                trainer.TrainStep();
                return (null, clock.Elapsed.TotalSeconds);
            }
            catch (Exception e) { return (e, clock.Elapsed.TotalSeconds); }
            finally { stageZeroDone.Set(); }
        }, timeout: TimeSpan.FromSeconds(2));

        var (error, seconds) = outcomes[0];
        var failure = Assert.IsType<CollectiveException>(error);
        Assert.Equal(CollectiveFailure.PeerStalled, failure.Failure);
        Assert.Contains("pipeline stage 1 (replica 0, 127.0.0.1:", failure.Message);
        Assert.Contains("within 2 s", failure.Message);
        Assert.True(seconds >= 1.9, $"stage 0 gave up after {seconds:F2} s, before its 2 s timeout");
    }

    [Fact]
    public async Task AListenerRefusesALinkFromAnotherGenerationAndTheDialerNamesTheStage()
    {
        using var listener = new StageListener("job", generation: 2, LinkKeys.Test, stage: 1, replica: 0, new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0));
        string address = $"127.0.0.1:{listener.LocalEndpoint.Port}";
        var accepting = Task.Run(() =>
        {
            try { listener.Accept("127.0.0.1:1", TimeSpan.FromSeconds(3)).Dispose(); return (Exception?)null; }
            catch (Exception e) { return e; }
        });
        var refused = Assert.Throws<CollectiveException>(() => StageLink.Dial("job", generation: 1, LinkKeys.Test, ownStage: 0, replica: 0, address, TimeSpan.FromSeconds(10)));
        Assert.Equal(CollectiveFailure.Refused, refused.Failure);
        Assert.Contains($"pipeline stage 1 (replica 0, {address}) refused stage 0 of job 'job' generation 1", refused.Message);
        Assert.Contains("generation 1 is not this stage's generation 2", refused.Message);
        var acceptError = Assert.IsType<CollectiveException>(await accepting);
        Assert.Equal(CollectiveFailure.PeerStalled, acceptError.Failure);
        Assert.Contains("last refusal", acceptError.Message);
    }
}
