// The training loop end to end on real data: it learns, it resumes exactly, its memory stays flat.
using System.Diagnostics;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class TrainerTests
{
    static DeepSeekConfig Micro(int vocab) => DeepSeekConfig.Tiny(vocab) with
    {
        HiddenSize = 64, IntermediateSize = 128, MoeIntermediateSize = 32, NumHiddenLayers = 2, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 32, QkNopeHeadDim = 16, QkRopeHeadDim = 8, VHeadDim = 16,
    };

    static (BpeTokenizer tok, TokenDataset train, TokenDataset val) Corpus(int seqLen, int vocab, int docs = 400)
    {
        var all = ShippedCorpus.Documents().Take(docs).ToList();
        var (train, val) = ShippedCorpus.Split(all, 0.1, 3);
        var tok = BpeTokenizer.Train(train, vocab);
        int eot = tok.EosTokenId!.Value;
        return (tok, TokenDataset.Pack(train.Select(d => tok.Encode(d)), eot, seqLen), TokenDataset.Pack(val.Select(d => tok.Encode(d)), eot, seqLen));
    }

    static Trainer NewTrainer(DeepSeekConfig config, TokenDataset train, TokenDataset? val, TrainingOptions options)
    {
        manual_seed(options.Seed);
        var model = new DeepSeekForCausalLM(config).InitializeWeights();
        return new Trainer(model, train, val, options, CPU, peakFlops: 1e11);
    }

    [Fact]
    public void TrainingOnTheShippedCorpusLowersValidationLossWellBelowTheUnigramBaseline()
    {
        var (tok, train, val) = Corpus(seqLen: 64, vocab: 512);
        var options = new TrainingOptions { SeqLen = 64, GlobalBatch = 16, MicroBatch = 8, Steps = 120, Lr = 3e-3, WarmupSteps = 10, EvalBatches = 4 };
        using var trainer = NewTrainer(Micro(tok.VocabSize), train, val, options);
        double unigram = StandaloneRun.UnigramLoss(train, val, tok.VocabSize);
        double before = trainer.Evaluate();
        StepMetrics? last = null;
        while (trainer.Step < options.Steps) last = trainer.TrainStep();
        double after = trainer.Evaluate();
        Assert.True(before > unigram, $"an untrained model should be worse than unigram ({before:F3} vs {unigram:F3})");
        Assert.True(after < unigram - 0.4, $"after {options.Steps} steps validation loss {after:F3} is not clearly below the unigram baseline {unigram:F3}");
        Assert.True(last!.MtpLoss < before, "the MTP head learns too");
        // Every token picks 2 experts in every MoE layer: the main layer sees 64 positions, the MTP layer 63.
        Assert.Equal([16L * 64 * 2, 16L * 63 * 2], last.ExpertLoad.Select(l => l.Sum()));
    }

    [Fact]
    public void ARunSavedAtStepKAndResumedGivesTheSameLossAtStepKPlusOne()
    {
        var (tok, train, val) = Corpus(seqLen: 32, vocab: 384, docs: 120);
        var options = new TrainingOptions { SeqLen = 32, GlobalBatch = 8, MicroBatch = 4, Steps = 10, Lr = 2e-3, WarmupSteps = 2, BiasUpdateSpeed = 0.01 };
        var config = Micro(tok.VocabSize);
        var dir = Directory.CreateTempSubdirectory("resume-").FullName;
        try
        {
            var uninterrupted = new List<double>();
            using (var a = NewTrainer(config, train, val, options))
                for (int i = 0; i < 5; i++) uninterrupted.Add(a.TrainStep().Loss);

            using (var b = NewTrainer(config, train, val, options))
            {
                for (int i = 0; i < 3; i++) b.TrainStep();
                TrainingCheckpoint.Save(dir, b, tok.Hash);
            }
            using var c = NewTrainer(config with { }, train, val, options with { Seed = options.Seed }) ;
            manual_seed(999); // a different global RNG state must not matter
            var state = TrainingCheckpoint.Load(TrainingCheckpoint.Latest(dir)!, c, tok.Hash);
            Assert.Equal(3, state.Step);
            Assert.Equal(3L * 8, state.ConsumedSamples);
            Assert.Equal(uninterrupted[3], c.TrainStep().Loss);
            Assert.Equal(uninterrupted[4], c.TrainStep().Loss);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void AResumeWithADifferentGlobalBatchIsRefusedWithTheReason()
    {
        var (tok, train, _) = Corpus(seqLen: 32, vocab: 300, docs: 60);
        var options = new TrainingOptions { SeqLen = 32, GlobalBatch = 8, MicroBatch = 4, Steps = 4, WarmupSteps = 1 };
        var dir = Directory.CreateTempSubdirectory("resume-bad-").FullName;
        try
        {
            using (var b = NewTrainer(Micro(tok.VocabSize), train, null, options)) { b.TrainStep(); TrainingCheckpoint.Save(dir, b, tok.Hash); }
            using var c = NewTrainer(Micro(tok.VocabSize), train, null, options with { GlobalBatch = 16 });
            var e = Assert.Throws<InvalidDataException>(() => TrainingCheckpoint.Load(TrainingCheckpoint.Latest(dir)!, c, tok.Hash));
            Assert.Contains("global_batch", e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }

    static long ResidentBytes()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmRSS:")) return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        return Process.GetCurrentProcess().WorkingSet64;
    }

    [Fact]
    public void ResidentMemoryAfter300StepsStaysWithinAFewPercentOfThatAfter50()
    {
        var (tok, train, _) = Corpus(seqLen: 32, vocab: 300, docs: 80);
        var options = new TrainingOptions { SeqLen = 32, GlobalBatch = 8, MicroBatch = 4, Steps = 300, Lr = 1e-3, WarmupSteps = 5 };
        using var trainer = NewTrainer(Micro(tok.VocabSize) with { NumHiddenLayers = 2, HiddenSize = 32, NumAttentionHeads = 2 }, train, null, options);
        long at50 = 0;
        while (trainer.Step < 300)
        {
            trainer.TrainStep();
            if (trainer.Step == 50) at50 = ResidentBytes();
        }
        long at300 = ResidentBytes();
        double growth = (double)(at300 - at50) / at50;
        Assert.True(growth < 0.03, $"resident memory grew {growth:P1} from step 50 ({at50 >> 20} MiB) to step 300 ({at300 >> 20} MiB)");
    }
}
