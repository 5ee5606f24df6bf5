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

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    public void NRanksWithTheSameGlobalBatchGiveOneProcesssLossCurveAndIdenticalReplicas(int world)
    {
        List<double> single;
        using (var trainer = new Trainer(NewModel(), Data.Value.Train, null, Options, CPU, peakFlops: 1e11))
            single = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();

        var models = new DeepSeekForCausalLM[world];
        for (int r = 0; r < world; r++) models[r] = NewModel(); // built in turn: the seed is global
        var perRank = RankGroup.Run(world, c =>
        {
            using var reducer = new BucketedGradientReducer(c, bucketBytes: 64 << 10); // small buckets: many all-reduces per step
            using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, Options, CPU, 1e11, c.Rank, world, reducer);
            var steps = new List<(double Loss, string Hash)>();
            for (int s = 0; s < Options.Steps; s++) steps.Add((trainer.TrainStep().Loss, WeightsHash(trainer)));
            return steps;
        }, limit: TimeSpan.FromSeconds(120));

        for (int s = 0; s < Options.Steps; s++)
        {
            // Every rank reports the loss of the whole global batch (averaged over ranks), not of its own share, and the
            // same bits on all of them.
            Assert.True(Math.Abs(perRank[0][s].Loss - single[s]) <= 1e-4 * Math.Abs(single[s]),
                        $"step {s + 1}: rank 0 of {world} reports {perRank[0][s].Loss}, one process {single[s]}");
            Assert.All(perRank, steps => Assert.Equal(perRank[0][s].Loss, steps[s].Loss));
            Assert.All(perRank, steps => Assert.Equal(perRank[0][s].Hash, steps[s].Hash));
        }
        foreach (var m in models) m.Dispose();
    }
}
