// Data-parallel training over the tcp collective gives one process's loss curve, with identical replicas after every step.
using System.Security.Cryptography;
using System.Runtime.InteropServices;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class DataParallelTrainingTests
{
    static DeepSeekConfig Micro(int vocab) => DeepSeekConfig.Tiny(vocab) with
    {
        HiddenSize = 64, IntermediateSize = 128, MoeIntermediateSize = 32, NumHiddenLayers = 2, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 32, QkNopeHeadDim = 16, QkRopeHeadDim = 8, VHeadDim = 16,
    };

    // Global batch 12 = 1 x 6 x 2 = 2 x 3 x 2 = 3 x 2 x 2 (ranks x accumulation x micro-batch).
    static readonly TrainingOptions Options = new()
    {
        SeqLen = 32, GlobalBatch = 12, MicroBatch = 2, Steps = 5, Lr = 2e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
    };

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = new(() =>
    {
        var docs = ShippedCorpus.Documents().Take(60).ToList();
        var tok = BpeTokenizer.Train(docs, 300);
        return (tok.VocabSize, TokenDataset.Pack(docs.Select(d => tok.Encode(d)), tok.EosTokenId!.Value, Options.SeqLen));
    });

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed); // every replica starts from the same weights
        return new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
    }

    static string WeightsHash(Trainer trainer)
    {
        using var sha = SHA256.Create();
        foreach (var slot in trainer.Optimizer.Slots)
        {
            var values = slot.Param.data<float>().ToArray();
            var bytes = MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0);
        }
        foreach (var layer in trainer.Model.MoeLayers())
        {
            var bias = MemoryMarshal.AsBytes(layer.gate.e_score_correction_bias.data<float>().ToArray().AsSpan()).ToArray();
            sha.TransformBlock(bias, 0, bias.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!);
    }

    /// <summary>
    /// The gradient, loss and expert-load sums are exact (ExactGradientSum), so the ranks' split of the global batch
    /// changes nothing: every rank of every world size holds the single process's weights, moments' effect and routing
    /// biases bit for bit after every step, and reports its loss to the last bit.
    /// </summary>
    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(6)]
    public void AnyNumberOfRanksTrainsBitForBitAsOneProcess(int world)
    {
        var single = new List<(double Loss, string Hash)>();
        using (var trainer = new Trainer(NewModel(), Data.Value.Train, null, Options, CPU, peakFlops: 1e11))
            for (int s = 0; s < Options.Steps; s++) single.Add((trainer.TrainStep().Loss, WeightsHash(trainer)));

        var models = new DeepSeekForCausalLM[world];
        for (int r = 0; r < world; r++) models[r] = NewModel(); // built in turn: the seed is global
        var perRank = RankGroup.Run(world, c =>
        {
            var reducer = new BucketedGradientReducer(c, bucketBytes: 64 << 10); // small buckets: many all-reduces per step
            using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, Options, CPU, 1e11, c.Rank, world, reducer);
            var steps = new List<(double Loss, string Hash)>();
            for (int s = 0; s < Options.Steps; s++) steps.Add((trainer.TrainStep().Loss, WeightsHash(trainer)));
            return steps;
        }, limit: TimeSpan.FromSeconds(120));

        for (int s = 0; s < Options.Steps; s++)
        {
            int step = s;
            Assert.All(perRank, steps => Assert.True(steps[step] == single[step],
                $"step {step + 1} on {world} ranks: loss {steps[step].Loss:R}, weights {steps[step].Hash[..12]}; one process: loss {single[step].Loss:R}, weights {single[step].Hash[..12]}"));
        }
        foreach (var m in models) m.Dispose();
    }
}
