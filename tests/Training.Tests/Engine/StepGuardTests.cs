// The trainer's guard: a step whose loss or gradient is NaN is never applied, and every rank skips it together even
// when only one rank's micro-batches went wrong.
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Collectives;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class StepGuardTests
{
    static readonly TrainingOptions Options = new() { SeqLen = 32, GlobalBatch = 8, MicroBatch = 2, Steps = 4, Lr = 2e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01 };

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = new(() =>
    {
        var docs = ShippedCorpus.Documents().Take(40).ToList();
        var tok = BpeTokenizer.Train(docs, 300);
        return (tok.VocabSize, TokenDataset.Pack(docs.Select(d => tok.Encode(d)), tok.EosTokenId!.Value, Options.SeqLen));
    });

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed);
        return new DeepSeekForCausalLM(DeepSeekConfig.Tiny(Data.Value.Vocab) with
        {
            HiddenSize = 64, IntermediateSize = 128, MoeIntermediateSize = 32, NumHiddenLayers = 2, NumAttentionHeads = 2,
            KvLoraRank = 16, QLoraRank = 32, QkNopeHeadDim = 16, QkRopeHeadDim = 8, VHeadDim = 16,
        }).InitializeWeights();
    }

    /// <summary>Every tensor of the training state (weights, routing biases, moments), hashed.</summary>
    static string StateHash(Trainer trainer)
    {
        using var sha = SHA256.Create();
        foreach (var (name, t) in trainer.CheckpointTensors().OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var bytes = MemoryMarshal.AsBytes(t.to_type(ScalarType.Float32).data<float>().ToArray().AsSpan()).ToArray();
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!);
    }

    [Fact]
    public void ANaNOnOneRankIsSkippedByEveryRankAndLeavesTheStateUntouched()
    {
        const int world = 2, poisonedStep = 3;
        var models = new DeepSeekForCausalLM[world];
        for (int r = 0; r < world; r++) models[r] = NewModel();
        var perRank = RankGroup.Run(world, c =>
        {
            var reducer = new BucketedGradientReducer(c);
            using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, Options, CPU, 1e11, c.Rank, world, reducer);
            var steps = new List<(bool Skipped, double Loss, double Norm, string Before, string After, long AdamSteps)>();
            for (int s = 1; s <= Options.Steps; s++)
            {
                string before = StateHash(trainer);
                // Rank 1 alone computes step 3 with a NaN in a norm's weight: its loss and gradients are NaN, rank 0's are not.
                var norm = trainer.Model.model.norm.weight!;
                using var saved = norm.clone();
                if (c.Rank == 1 && s == poisonedStep) using (no_grad()) norm.narrow(0, 0, 1).fill_(double.NaN);
                var m = trainer.TrainStep();
                using (no_grad()) norm.copy_(saved);
                steps.Add((m.Skipped, m.Loss, m.GradNorm, before, StateHash(trainer), trainer.Optimizer.StepCount));
            }
            return (Steps: steps, trainer.Step);
        });

        foreach (var (steps, step) in perRank)
        {
            Assert.Equal(Options.Steps, step); // the skipped step's samples are used up: the data position moves on
            for (int s = 1; s <= Options.Steps; s++)
            {
                var x = steps[s - 1];
                Assert.Equal(s == poisonedStep, x.Skipped);
                if (s == poisonedStep)
                {
                    Assert.True(double.IsNaN(x.Loss) || double.IsNaN(x.Norm), $"step {s}: loss {x.Loss}, norm {x.Norm}");
                    Assert.Equal(x.Before, x.After); // weights, biases and moments: not a bit changed
                }
                else Assert.NotEqual(x.Before, x.After);
            }
            Assert.Equal(Options.Steps - 1, steps[^1].AdamSteps); // bias correction counts applied updates only
        }
        // The ranks agree after the skip and after the step that follows it.
        Assert.Equal(perRank[0].Steps[^1].After, perRank[1].Steps[^1].After);
    }
}
