// Plain data parallelism with the gradient all-reduce overlapped with the last micro-batch's backward trains bit for bit
// as with the all-reduce after the backward (and as one process), over real tcp between rank threads; a failed
// collective during the overlapped backward surfaces as the same error and leaves no exchange thread behind.
using System.Text.RegularExpressions;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public sealed class OverlappedReductionTests(ITestOutputHelper output)
{
    // Global batch 12 = 1 x 6 x 2 = 2 x 3 x 2 = 3 x 2 x 2: several micro-batches per step on every rank, so the earlier
    // ones add locally and only the last one's backward overlaps.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 12, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    static DeepSeekConfig Config => MicroModel.Config(MicroModel.Data.Value.Vocab);

    sealed record Ran(List<StepMetrics> Steps, Dictionary<string, double[]> State, long Buckets, long DuringBackward, bool? OnThread);

    static DeepSeekForCausalLM NewModel()
    {
        var m = DeepSeekForCausalLM.FromSeed(Config, Options.Seed);
        m.to(ScalarType.Float64);
        return m;
    }

    /// <summary>Every weight, both moments of every slot and every MoE layer's routing bias, as doubles.</summary>
    static Ran Collect(Trainer trainer, List<StepMetrics> steps)
    {
        var state = trainer.Model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().data<double>().ToArray());
        foreach (var s in trainer.Optimizer.Slots)
        {
            state[$"{s.Name}.exp_avg"] = s.ExpAvg.data<double>().ToArray();
            state[$"{s.Name}.exp_avg_sq"] = s.ExpAvgSq.data<double>().ToArray();
        }
        int l = 0;
        foreach (var moe in trainer.Model.MoeLayers()) state[$"routing bias {l++}"] = moe.gate.e_score_correction_bias.data<double>().ToArray();
        var (buckets, during) = trainer.OverlappedBuckets;
        return new Ran(steps, state, buckets, during, trainer.OverlapExchangedOnThread);
    }

    static Ran[] Train(int dp, bool overlap, long bucketBytes, string recompute, bool? exchangeThread = null, bool fastPaths = true)
    {
        var options = Options with { OverlapGradientReduction = overlap, Recompute = recompute, ExchangeThread = exchangeThread };
        var models = Enumerable.Range(0, dp).Select(_ => NewModel()).ToArray();
        try
        {
            if (dp == 1)
            {
                using var single = new Trainer(models[0], MicroModel.Data.Value.Train, null, options, CPU, 1e11);
                return [Collect(single, [.. Enumerable.Range(0, (int)Options.Steps).Select(_ => single.TrainStep())])];
            }
            return RankGroup.Run(dp, c =>
            {
                using var trainer = new Trainer(models[c.Rank], MicroModel.Data.Value.Train, null, options, CPU, 1e11, c.Rank, dp, new BucketedGradientReducer(c, bucketBytes))
                {
                    ExactSumFastPaths = fastPaths,
                };
                Assert.Equal(overlap, trainer.OverlapsReduction);
                return Collect(trainer, [.. Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep())]);
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>
    /// dp 2 and 3, with buckets of one layer's words or less (many buckets during the backward) and with buckets that take
    /// several layers: the overlapped all-reduce gives the same loss, MTP loss, clipped norm and expert loads at every
    /// step, and every weight, both moments and the routing biases, bit for bit, as the all-reduce after the backward and
    /// as one process; buckets were all-reduced during the backward (the head's group too), and none without the overlap. With full recompute
    /// each layer's parameters get their gradients inside its rerun segment, before the layer's signal all the same.
    /// </summary>
    [Theory]
    [InlineData(2, 4 << 10, "none")]
    [InlineData(3, 4 << 10, "none")]
    [InlineData(2, 384 << 10, "full")]
    public void OverlappedAllReduceTrainsBitForBitAsTheAllReduceAfterTheBackward(int dp, long bucketBytes, string recompute)
    {
        var single = Train(1, overlap: false, bucketBytes, recompute)[0];
        var after = Train(dp, overlap: false, bucketBytes, recompute);
        var overlapped = Train(dp, overlap: true, bucketBytes, recompute);
        for (int r = 0; r < dp; r++)
        {
            for (int s = 0; s < Options.Steps; s++)
            {
                var (one, a, o) = (single.Steps[s], after[r].Steps[s], overlapped[r].Steps[s]);
                output.WriteLine($"dp {dp} rank {r} step {s + 1}: loss {o.Loss:R} (after {a.Loss:R}, one process {one.Loss:R}), norm {o.GradNorm:R} ({a.GradNorm:R})");
                Assert.True(a.GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {a.GradNorm})");
                foreach (var reference in new[] { a, one })
                {
                    Assert.Equal(reference.Loss, o.Loss);
                    Assert.Equal(reference.MtpLoss, o.MtpLoss);
                    Assert.Equal(reference.GradNorm, o.GradNorm);
                    Assert.Equal(reference.ExpertLoad.Select(l => string.Join(",", l)), o.ExpertLoad.Select(l => string.Join(",", l)));
                }
            }
            foreach (var (name, values) in single.State)
            {
                Assert.True(values.SequenceEqual(after[r].State[name]), $"'{name}' on rank {r} after the backward differs from one process");
                Assert.True(values.SequenceEqual(overlapped[r].State[name]), $"'{name}' on rank {r} with the overlap differs from one process");
            }
            output.WriteLine($"rank {r}: {overlapped[r].Buckets} buckets, {overlapped[r].DuringBackward} during a backward");
            Assert.Equal(0, after[r].Buckets);
            Assert.True(overlapped[r].DuringBackward > 0, "no bucket was all-reduced during a backward");
            Assert.True(overlapped[r].OnThread, "a CPU collective's overlapped all-reduce runs on an exchange thread of its own");
            Assert.True(overlapped[r].Buckets > overlapped[r].DuringBackward, "the parameters outside the layers go after the backward");
        }
        // Small buckets: one per decoder layer (main and MTP) and one for the head's group (final norm, head, MTP norms and
        // projection), all during the backward, and the embedding's after it, each step.
        long signalled = Options.Steps * (Config.NumHiddenLayers + Config.NumNextnPredictLayers + 1);
        if (bucketBytes < 64 << 10) Assert.Equal((signalled + Options.Steps, signalled), (overlapped[0].Buckets, overlapped[0].DuringBackward));
        else Assert.True(overlapped[0].Buckets < signalled, $"{overlapped[0].Buckets} buckets of {bucketBytes} bytes: some should take several layers");
    }

    /// <summary>
    /// The CUDA shape on CPU tensors: no exchange thread (TrainingOptions.ExchangeThread = false), so each bucket's words are
    /// converted and all-reduced inline by the backward's own thread as the layer's signal fires, and the words made by
    /// torch's tensor arithmetic, not the CPU's one-pass kernels (ExactSumFastPaths off: what a CUDA tensor takes). Only
    /// NCCL's launch on its side stream differs on a GPU. It trains bit for bit as the all-reduce after the backward, with
    /// every layer's bucket all-reduced during the backward.
    /// </summary>
    [Fact]
    public void WithoutAnExchangeThreadAsOnCudaTheOverlappedAllReduceTrainsBitForBitAsTheAllReduceAfterTheBackward()
    {
        const int dp = 2;
        const long bucketBytes = 4 << 10;
        var after = Train(dp, overlap: false, bucketBytes, "none");
        var inline = Train(dp, overlap: true, bucketBytes, "none", exchangeThread: false, fastPaths: false);
        for (int r = 0; r < dp; r++)
        {
            ExpertParallelTrainingTests.AssertStepsEqualSingle([inline[r].Steps], after[r].Steps, Options.ClipNorm, output, $"inline overlap of dp rank {r}:", "after the backward");
            foreach (var (name, values) in after[r].State)
                Assert.True(values.SequenceEqual(inline[r].State[name]), $"'{name}' on rank {r} with the inline overlap differs from the all-reduce after the backward");
            long signalled = Options.Steps * (Config.NumHiddenLayers + Config.NumNextnPredictLayers + 1);
            Assert.Equal((signalled + Options.Steps, signalled), (inline[r].Buckets, inline[r].DuringBackward));
            Assert.False(inline[r].OnThread, "the seam should have run the exchange on the backward's thread");
        }
    }

    /// <summary>
    /// Rank 1 closes its links after the first step; rank 0's second step then fails in its first all-reduce, which the
    /// overlap makes during the last micro-batch's backward on its exchange thread: the step throws the same
    /// CollectiveException (failure, peer, message but the ports and "while sending") as the all-reduce after the backward, and no exchange
    /// thread is left running once the step has thrown.
    /// </summary>
    [Fact]
    public void AFailedCollectiveDuringTheOverlappedBackwardThrowsTheSameErrorAndLeavesNoThread()
    {
        var errors = new Dictionary<bool, CollectiveException>();
        foreach (bool overlap in new[] { false, true })
        {
            var options = Options with { OverlapGradientReduction = overlap };
            var models = Enumerable.Range(0, 2).Select(_ => NewModel()).ToArray();
            var outcomes = RankGroup.Outcomes(2, c =>
            {
                using var trainer = new Trainer(models[c.Rank], MicroModel.Data.Value.Train, null, options, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c, 4 << 10));
                trainer.TrainStep();
                if (c.Rank == 1) { c.Dispose(); return 0; }
                try { trainer.TrainStep(); }
                finally { AssertNoExchangeThread(); } // before the trainer's Dispose: the step itself ended its thread
                return 1;
            }, new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(20) }, limit: TimeSpan.FromSeconds(120));
            foreach (var m in models) m.Dispose();
            Assert.Null(outcomes[1].Error);
            errors[overlap] = Assert.IsType<CollectiveException>(outcomes[0].Error);
            output.WriteLine($"overlap {overlap}: {errors[overlap].Failure}, peer {errors[overlap].PeerRank}: {errors[overlap].Message}");
        }
        var (after, during) = (errors[false], errors[true]);
        Assert.Equal(after.Failure, during.Failure);
        Assert.Equal(1, during.PeerRank);
        Assert.Equal(after.PeerRank, during.PeerRank);
        // Whether rank 0 meets the closed link while sending or while receiving is a race in either path, and only the
        // message's last words say which.
        static string WithoutPorts(string m) => Regex.Replace(Regex.Replace(m, @":\d+", ":port"), @" while sending\)$", ")");
        Assert.Equal(WithoutPorts(after.Message), WithoutPorts(during.Message));
    }

    /// <summary>
    /// Both ranks' data source fails once, on the last micro-batch of step 2, after the overlap armed that micro-batch: the
    /// step throws that error, no exchange thread is left (both ranks checked between barriers), and the step tried again
    /// and the one after it train bit for bit as a run that never failed (an armed step that threw used to leave the
    /// overlap armed, and every later step refused to arm it again).
    /// </summary>
    [Fact]
    public void AStepThatThrowsAfterArmingLeavesNothingArmedAndTheRetryTrainsAsIfItHadNotFailed()
    {
        var undisturbed = Train(2, overlap: true, 4 << 10, "none");
        var options = Options with { OverlapGradientReduction = true };
        var models = Enumerable.Range(0, 2).Select(_ => NewModel()).ToArray();
        using var barrier = new Barrier(2);
        try
        {
            var ran = RankGroup.Run(2, c =>
            {
                // Step 2's last micro-batch on this rank (global batch 12 = 2 ranks x 3 micro-batches of 2).
                long failAt = Options.GlobalBatch + c.Rank * (Options.GlobalBatch / 2) + 2 * Options.MicroBatch;
                var source = new FailingOnce(new Training.Data.PermutedSamples(MicroModel.Data.Value.Train, (ulong)options.Seed), failAt);
                using var trainer = new Trainer(models[c.Rank], source, null, options, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c, 4 << 10));
                var steps = new List<StepMetrics> { trainer.TrainStep() };
                var e = Assert.Throws<IOException>(() => trainer.TrainStep());
                Assert.Equal(FailingOnce.Message, e.Message);
                barrier.SignalAndWait(TimeSpan.FromSeconds(60)); // both ranks' failed steps are over
                AssertNoExchangeThread();
                barrier.SignalAndWait(TimeSpan.FromSeconds(60)); // neither has armed its retry yet while the other looked
                while (steps.Count < Options.Steps) steps.Add(trainer.TrainStep());
                return Collect(trainer, steps);
            }, limit: TimeSpan.FromSeconds(150));
            for (int r = 0; r < 2; r++)
            {
                Assert.Equal(undisturbed[r].Steps.Select(m => m.Loss), ran[r].Steps.Select(m => m.Loss));
                Assert.Equal(undisturbed[r].Steps.Select(m => m.GradNorm), ran[r].Steps.Select(m => m.GradNorm));
                foreach (var (name, values) in undisturbed[r].State)
                    Assert.True(values.SequenceEqual(ran[r].State[name]), $"'{name}' on rank {r} differs from the run that never failed");
            }
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>The corpus, but the fetch that starts at <paramref name="failAt"/> fails the first time.</summary>
    sealed class FailingOnce(Training.Data.ISampleSource inner, long failAt) : Training.Data.ISampleSource
    {
        public const string Message = "the data service went away (injected)";
        bool failed;
        public int SeqLen => inner.SeqLen;
        public long SampleCount => inner.SampleCount;
        public IReadOnlyList<Training.Parallel.SampleRange> TakeServed() => inner.TakeServed();

        public Tensor Fetch(long globalStart, int count)
        {
            if (globalStart == failAt && !failed) { failed = true; throw new IOException(Message); }
            return inner.Fetch(globalStart, count);
        }
    }

    /// <summary>
    /// The step joined its exchange thread (Thread.Join returns once the managed thread is done); the kernel drops the
    /// task a moment later, as the thread's native exit completes, so its absence is awaited, up to a deadline.
    /// </summary>
    static void AssertNoExchangeThread()
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        List<string> left;
        while ((left = ExchangeThreads()).Count > 0 && DateTime.UtcNow < deadline) Thread.Yield();
        Assert.True(left.Count == 0, $"{left.Count} exchange thread(s) still running after the step threw");
    }

    /// <summary>The threads of this process that Linux names after the overlap's exchange thread.</summary>
    static List<string> ExchangeThreads() =>
        [.. Directory.GetDirectories("/proc/self/task").Select(t => Path.Combine(t, "comm")).Where(File.Exists)
            .Select(f => { try { return File.ReadAllText(f).Trim(); } catch (IOException) { return ""; } })
            .Where(n => n.StartsWith("dp-grad-reduce", StringComparison.Ordinal))];
}
