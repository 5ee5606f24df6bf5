// Expert parallelism inside pipeline stages (pp 2 x dp 2 x ep 2, rank threads over real tcp) equals the single-process
// trainer in float64 (losses, clipped norm, expert loads, every weight, both moments, routing biases, evaluation), and
// its checkpoint loads into one process bitwise.
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Pipeline;

public sealed class ExpertPipelineTrainingTests(ITestOutputHelper output) : IDisposable
{
    const int Dp = 2, Pp = 2, Ep = 2;
    const double Tolerance = 1e-9; // the stages' shares of the norm are summed along the pipeline, not row by row
    const int EvalBatches = 3;
    readonly string root = Directory.CreateTempSubdirectory("eppp-ckpt-").FullName;

    // 4 decoder layers (1 dense, 3 MoE) and a MoE MTP module, split 2 + 2: each stage has MoE layers to exchange tokens in.
    // Global batch 8 = 2 replicas x 2 micro-batches x 2, so stage 0 holds two micro-batches at once under 1F1B (one
    // source's expert leaves wait while the other's backward runs). The clip of 0.5 is active in every step.
    static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab, layers: 4);

    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(ScalarType.Float64);
        return model;
    }

    sealed record Held(List<StepMetrics> Steps, Dictionary<string, double[]> Tensors, double Evaluation)
    {
        public int Stage, Replica;
        public long SentBytes;
        public ManifestFile? File;
        public ShardingPlan? Plan;
    }

    /// <summary>Weights, routing biases and both moments under checkpoint names (optimizer.*), as float64 arrays.</summary>
    static Dictionary<string, double[]> Tensors(IEnumerable<KeyValuePair<string, Tensor>> tensors) =>
        tensors.ToDictionary(kv => kv.Key, kv => kv.Value.detach().cpu().to_type(ScalarType.Float64).data<double>().ToArray());

    static Held RunSingle(TrainingOptions options)
    {
        using var model = NewModel();
        using var trainer = new Trainer(model, Data.Value.Train, null, options, CPU, peakFlops: 1e11);
        var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        double evaluation = trainer.Evaluate(new PermutedSamples(Data.Value.Train, 7), EvalBatches);
        return new Held(steps, Tensors(CheckpointTensors.Collect(model, trainer.Optimizer)), evaluation);
    }

    static readonly ParallelLayout Layout = ParallelLayout.Even(Dp, Pp, 4).WithShards(Ep, 0, 8);
    const string Job = "eppp-job";

    /// <summary>Trains pp 2 x dp 2 x ep 2 for 3 steps; each rank then writes its checkpoint file into <paramref name="store"/>.</summary>
    static Held[] RunExpertPipeline(FolderCheckpointStore store, TrainingOptions options)
    {
        Assert.Equal(8, Micro(Data.Value.Vocab).NRoutedExperts);
        var models = new DeepSeekForCausalLM[Dp * Pp];
        for (int r = 0; r < models.Length; r++)
        {
            models[r] = NewModel();
            ExpertParallel.ShardModel(models[r], Layout, r);
        }
        try
        {
            return PipelineGroup.Run(Dp, Pp, rank =>
            {
                int worldRank = Layout.Rank(rank.Stage, rank.Replica);
                var stage = new PipelineStage(models[worldRank], Layout, rank.Stage);
                var reducer = new BucketedGradientReducer(rank.StageGroup!, bucketBytes: 16 << 10);
                using var trainer = new PipelineTrainer(stage, new PermutedSamples(Data.Value.Train, (ulong)Options.Seed), options with { Ep = Ep }, CPU, 1e11,
                                                        rank.Links, rank.Replica, Dp, reducer);
                var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                long sent = stage.MoeLayers().First().Parallel!.TakeTraffic().SentBytes;
                double evaluation = trainer.Evaluate(new PermutedSamples(Data.Value.Train, 7), EvalBatches);
                var plan = new ShardingPlan(Layout, stage.CheckpointCatalog);
                var file = ShardedCheckpointWriter.WriteRank(store, plan, worldRank, Options.Steps, trainer.CheckpointTensors());
                return new Held(steps, Tensors(trainer.CheckpointTensors()), evaluation)
                    { Stage = rank.Stage, Replica = rank.Replica, SentBytes = sent, File = file, Plan = plan };
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    static double MaxDifference(double[] a, double[] b)
    {
        Assert.Equal(a.Length, b.Length);
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        return max;
    }

    /// <summary>
    /// Clipped (0.5, active in every step) with MTP: to 1e-9, since each stage's share of the norm is summed along the
    /// pipeline, and the embedding's gradient from the MTP module arrives along the pipeline, added in another order.
    /// Unclipped without MTP: every value is the single process's bit for bit (but the reported norm and aux loss, sums
    /// over the stages in another order). Full recompute in the stages (the expert leaves of other sources are made again
    /// in backward) changes no bit.
    /// </summary>
    [Theory]
    [InlineData(0.5, 0.3, "none")]
    [InlineData(0.0, 0.0, "none")]
    [InlineData(0.0, 0.0, "full")]
    public async Task ExpertParallelStagesEqualTheSingleProcessAndTheirCheckpointLoadsIntoOneProcessBitwise(double clipNorm, double mtpWeight, string recompute)
    {
        var options = Options with { ClipNorm = clipNorm, MtpWeight = mtpWeight, Recompute = recompute };
        double tolerance = clipNorm > 0 ? Tolerance : 0;
        using var store = new FolderCheckpointStore(root, Job);
        var ranks = RunExpertPipeline(store, options);
        var single = RunSingle(options with { Recompute = "none" });

        for (int s = 0; s < Options.Steps; s++)
        {
            var one = single.Steps[s];
            Assert.True(clipNorm == 0 || one.GradNorm > clipNorm, $"step {s + 1}: the clip should be active (norm {one.GradNorm})");
            foreach (var r in ranks)
            {
                var m = r.Steps[s];
                output.WriteLine($"stage {r.Stage} replica {r.Replica} step {s + 1}: loss {m.Loss:R} (single {one.Loss:R}), MTP {m.MtpLoss:R} (single {one.MtpLoss:R}), norm {m.GradNorm:R} (single {one.GradNorm:R})");
                foreach (var (what, got, want) in new[] { ("loss", m.Loss, one.Loss), ("MTP loss", m.MtpLoss ?? 0, one.MtpLoss ?? 0), ("aux loss", m.AuxLoss!.Value, one.AuxLoss!.Value), ("clipped norm", m.GradNorm, one.GradNorm) })
                    Assert.True(Math.Abs(got - want) <= (what is "clipped norm" or "aux loss" ? Tolerance : tolerance) * want, $"step {s + 1}, stage {r.Stage} replica {r.Replica}: {what} {got:R}, the single process {want:R}");
                // Routing is the single process's: the loads of every MoE layer (3 decoder layers, the MTP module), summed over the stage's replicas.
                Assert.Equal(mtpWeight > 0, m.MtpLoss is not null);
                Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
            }
        }
        Assert.All(ranks, r => Assert.True(r.SentBytes > 0, $"stage {r.Stage} replica {r.Replica} sent no token to the other expert shard"));

        // Every weight, routing bias and moment on the one rank of its stage holding it (dp / ep = 1 holder per expert).
        double worst = 0;
        foreach (var (name, expected) in single.Tensors)
        {
            var holders = ranks.Where(r => r.Tensors.ContainsKey(name)).ToList();
            bool expert = ExpertParallel.IsExpertParameter(name);
            Assert.True(holders.Count == (expert ? Dp / Ep : Dp) && holders.Select(h => h.Stage).Distinct().Count() == 1,
                $"'{name}' is held by {holders.Count} ranks: {string.Join(", ", holders.Select(h => $"stage {h.Stage} replica {h.Replica}"))}");
            foreach (var h in holders)
            {
                double diff = MaxDifference(expected, h.Tensors[name]);
                worst = Math.Max(worst, diff);
                Assert.True(diff <= tolerance, $"'{name}' on stage {h.Stage} replica {h.Replica} differs from the single process by {diff:E2}");
            }
        }
        output.WriteLine($"clip {clipNorm}, MTP weight {mtpWeight}, recompute {recompute}: {single.Tensors.Count} tensors, largest difference from the single process {worst:E2}");
        Assert.Contains(single.Tensors.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        Assert.Contains(single.Tensors.Keys, n => n.StartsWith("optimizer.", StringComparison.Ordinal) && n.Contains(".mlp.experts.", StringComparison.Ordinal) && n.EndsWith(".exp_avg_sq", StringComparison.Ordinal));

        // Evaluation through the stages: every replica forwards together (the MoE exchange spans them).
        output.WriteLine($"evaluation: {ranks[0].Evaluation:R}, single {single.Evaluation:R}");
        Assert.All(ranks, r => Assert.True(Math.Abs(r.Evaluation - single.Evaluation) <= tolerance * single.Evaluation,
            $"stage {r.Stage} replica {r.Replica} evaluates {r.Evaluation:R}, the single process {single.Evaluation:R}"));

        // The checkpoint: every rank names the same whole-model catalogue; together they write each tensor once.
        Assert.All(ranks, r => Assert.Equal(ranks[0].Plan!.Tensors.Select(t => t.Name), r.Plan!.Tensors.Select(t => t.Name)));
        var written = ranks.SelectMany(r => r.Plan!.WritesOf(Layout.Rank(r.Stage, r.Replica))).GroupBy(w => w.Name)
            .ToDictionary(g => g.Key, g => g.Sum(w => w.RowCount));
        Assert.Equal(single.Tensors.Keys.Order(), written.Keys.Order());
        Assert.All(ranks[0].Plan!.Tensors, t => Assert.Equal(t.Rows, written[t.Name]));
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(Job, ranks[0].Plan!,
            new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps), ranks.Select(r => r.File!), Micro(Data.Value.Vocab).ToJson(), null));

        using var model = NewModel();
        using var optimizer = Trainer.CreateOptimizer(model, Options);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
        Assert.Equal(Options.Steps, optimizer.StepCount);
        var loaded = Tensors(CheckpointTensors.Collect(model, optimizer));
        Assert.Equal(single.Tensors.Keys.Order(), loaded.Keys.Order());
        foreach (var (name, values) in loaded)
        {
            var holder = ranks.First(r => r.Tensors.ContainsKey(name));
            Assert.True(holder.Tensors[name].AsSpan().SequenceEqual(values), $"'{name}' loaded into one process differs from stage {holder.Stage} replica {holder.Replica}'s");
        }
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
