// parallel.redundancy's per-step cost: the refresh of each rank's copy of its ring neighbour's singly held pieces, against the step.
using System.Diagnostics;
using System.Net;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// dp x pp ranks as threads over tcp on 127.0.0.1 (one torch thread each), ZeRO 0..3 and ep, real Trainer (pp 1) or
/// PipelineTrainer steps (each stage's replicas a ring of their own, the stages joined by stage links, as the worker forms
/// them). Rounds alternate a block of steps without redundancy and a block where, as the worker's step loop does
/// (StepLoop), every step is followed by <see cref="LiveShards.Refresh"/> over the rank's ring: the all-to-all that sends
/// this rank's pieces (AdamW moments of its ZeRO rows, the master or ZeRO-3 parameter rows, under ep its expert shard's
/// singly held rows and weights) to the rank before it. Reported: the bytes each rank sends per refresh, the refresh's
/// seconds, and the step's seconds with and without it (the slowest rank, as the ring and the pipeline wait for it).
/// </summary>
public static class RedundancyBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("redundancy", args);
        string preset = o.String("--preset", "tiny");
        int dp = o.Int("--dp", 4, 1), pp = o.Int("--pp", 1, 1), ep = o.Int("--ep", 1, 1), zero = o.Int("--zero", 1, 0);
        int steps = o.Int("--steps", 4, 1), rounds = o.Int("--rounds", 3, 1);
        o.Done();
        if (zero == 0 && ep == 1) throw new ArgumentException("--zero 0 with --ep 1: parallel.redundancy needs zero 1..3 or ep > 1 (a replicated rank holds nothing alone)");
        var config = DeepSeekConfig.Preset(preset);
        var options = new TrainingOptions { SeqLen = 64, GlobalBatch = 4 * dp * pp, MicroBatch = 4, Steps = 1_000_000, WarmupSteps = 1, Zero = zero, Ep = ep };
        var layout = ParallelLayout.Even(dp, pp, config.NumHiddenLayers).WithShards(ep, zero, config.NRoutedExperts);
        string plan = $"dp {dp}{(pp > 1 ? $" x pp {pp}" : "")}{(ep > 1 ? $" ep {ep}" : "")} zero {zero}";
        Console.WriteLine($"# DeepSeekCluster redundancy refresh benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores, load average {Load()} at start; preset '{preset}' fp32, {plan}, ranks as threads " +
                          $"over tcp on 127.0.0.1, 1 torch thread each, seq {options.SeqLen} x global batch {options.GlobalBatch} (micro {options.MicroBatch}); " +
                          $"{rounds} rounds of {steps} steps without, then {steps} with the refresh (after 1 warm-up step each way)");
        var rng = new Random(1);
        var tokens = new int[(options.SeqLen + 1) * 512];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new TokenDataset(tokens, options.SeqLen);
        var models = Enumerable.Range(0, layout.WorldSize).Select(r =>
        {
            manual_seed(1);
            var m = new DeepSeekForCausalLM(config).InitializeWeights();
            if (ep > 1) ExpertParallel.ShardModel(m, layout, r);
            return m;
        }).ToArray();
        (List<double> Plain, List<double> With, List<double> Refresh, long Bytes) OnRank(int stage, int replica, ICollective ring, PipelineLinks? links)
        {
            set_num_threads(1);
            var model = models[layout.Rank(stage, replica)];
            // Whole shapes by checkpoint name, read before the trainer exists: under ZeRO-3 it empties the parameters at once.
            var whole = model.named_parameters().ToDictionary(p => model.ToHfName(p.name), p => p.parameter.shape);
            var pipelineStage = links is null ? null : new PipelineStage(model, layout, stage);
            using ITrainer trainer = pipelineStage is null
                ? new Trainer(model, data, null, options, CPU, 1e11, replica, dp, new BucketedGradientReducer(ring))
                : new PipelineTrainer(pipelineStage, new PermutedSamples(data, 1), options, CPU, 1e11, links!, replica, dp, new BucketedGradientReducer(ring));
            var state = new ReplicaState
            {
                JobId = "bench", Fingerprint = "bench", Model = model, Stage = pipelineStage, Optimizer = trainer.Optimizer,
                ZeroShard = replica, ZeroShards = dp, Ep = ep, ShardedParameters = zero == 3,
                Shapes = [.. trainer.Optimizer.Slots.Select(s => whole[s.Name])], // as the worker's Resumption keeps them
            };
            // As the worker's StepLoop: under ZeRO-3 the trainer holds this rank's parameter rows between steps.
            Func<int, Tensor>? ownRows = ((trainer as Trainer)?.ShardedParameters ?? (trainer as PipelineTrainer)?.ShardedParameters) is { } sharded ? sharded.OwnRows : null;
            var plain = new List<double>();
            var withRefresh = new List<double>();
            var refresh = new List<double>();
            long bytes = 0;
            void Step(List<double>? times, bool redundant)
            {
                ring.Barrier(); // the stage's replicas start the step together: a step's time is its own, not the last one's straggler
                var sw = Stopwatch.StartNew();
                trainer.TrainStep();
                state.Step = trainer.Step;
                double step = sw.Elapsed.TotalSeconds;
                if (redundant)
                {
                    var r = Stopwatch.StartNew();
                    bytes = LiveShards.Refresh(ring, state, ownRows);
                    refresh.Add(r.Elapsed.TotalSeconds);
                }
                times?.Add(step + (redundant ? refresh[^1] : 0));
            }
            Step(null, false);
            Step(null, true);
            refresh.Clear();
            for (int r = 0; r < rounds; r++)
            {
                for (int s = 0; s < steps; s++) Step(plain, false);
                for (int s = 0; s < steps; s++) Step(withRefresh, true);
            }
            state.Neighbour?.Dispose();
            return (Plain: plain, With: withRefresh, Refresh: refresh, Bytes: bytes);
        }
        var perRank = pp == 1 ? ExpertBench.OnRanks(dp, c => OnRank(0, c.Rank, c, null)) : ExpertBench.OnStages(dp, pp, OnRank);
        // The ring moves at its slowest rank's pace: per step, the slowest rank's time.
        double[] Slowest(Func<(List<double> Plain, List<double> With, List<double> Refresh, long Bytes), List<double>> pick) =>
            [.. Enumerable.Range(0, pick(perRank[0]).Count).Select(i => perRank.Max(r => pick(r)[i]))];
        var plainSteps = Slowest(r => r.Plain);
        var withSteps = Slowest(r => r.With);
        var refreshes = Slowest(r => r.Refresh);
        long sent = perRank.Max(r => r.Bytes);
        double plainMedian = Median(plainSteps), withMedian = Median(withSteps), refreshMedian = Median(refreshes);
        Console.WriteLine();
        Console.WriteLine("| preset, layout | bytes sent per rank per refresh (most of any rank) | refresh s, median (min–max) | MB/s per rank | step s without redundancy, median (min–max) | step + refresh s, median (min–max) | refresh % of the step | load average at end |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|");
        Console.WriteLine($"| {preset}, {plan} | {sent:N0} ({sent / 1e6:F1} MB) | {refreshMedian:F3} ({refreshes.Min():F3}–{refreshes.Max():F3}) | {sent / 1e6 / refreshMedian:F0} | " +
                          $"{plainMedian:F3} ({plainSteps.Min():F3}–{plainSteps.Max():F3}) | {withMedian:F3} ({withSteps.Min():F3}–{withSteps.Max():F3}) | {100 * refreshMedian / plainMedian:F1}% | {Load()} |");
        foreach (var m in models) m.Dispose();
    }

    static double Median(IReadOnlyList<double> values)
    {
        var s = values.Order().ToArray();
        return s.Length == 0 ? double.NaN : s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    static string Load() => File.ReadAllText("/proc/loadavg").Split(' ')[0];
}
