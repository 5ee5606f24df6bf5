// A tiny DeepSeek-V3 model (MLA, grouped sigmoid routing with a non-zero correction bias, one MTP layer) and its tokenizer, in an HF folder.
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Export;

public sealed class ExportModelFixture : IDisposable
{
    public string Root { get; } = Directory.CreateTempSubdirectory("export-tests-").FullName;
    public string ModelDir => Path.Combine(Root, "model");
    public DeepSeekForCausalLM Model { get; }
    public BpeTokenizer Tokenizer { get; }
    public IReadOnlyList<string> HeldOut { get; }

    public ExportModelFixture()
    {
        var (train, validation) = ShippedCorpus.Split(ShippedCorpus.Documents().Take(60).ToList(), validationFraction: 0.2, seed: 7);
        HeldOut = validation;
        Tokenizer = BpeTokenizer.Train(train, vocabSize: 384);
        Model = Build(Tokenizer.VocabSize);
        HfModelFolder.Save(ModelDir, Model, Tokenizer);
    }

    /// <summary>
    /// About 250k parameters. Weights are drawn wider than the usual 0.02 so logits and routing scores are well
    /// separated, and rounded to fp16 so an F16 export holds exactly our weights: what differs is only how the
    /// two runtimes compute. The correction bias is non-zero so a lost exp_probs_b would change the experts chosen.
    /// </summary>
    public static DeepSeekForCausalLM Build(int vocab, Func<DeepSeekConfig, DeepSeekConfig>? edit = null)
    {
        var config = new DeepSeekConfig
        {
            VocabSize = vocab, HiddenSize = 64, IntermediateSize = 128, MoeIntermediateSize = 32,
            NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 4,
            NSharedExperts = 1, NRoutedExperts = 8, NumExpertsPerTok = 2, NGroup = 4, TopkGroup = 2,
            RoutedScalingFactor = 2.5, KvLoraRank = 32, QLoraRank = 32,
            QkNopeHeadDim = 32, QkRopeHeadDim = 16, VHeadDim = 32,
            FirstKDenseReplace = 1, MaxPositionEmbeddings = 256, NumNextnPredictLayers = 1, InitializerRange = 0.08,
        };
        if (edit is not null) config = edit(config);
        manual_seed(1234);
        var model = new DeepSeekForCausalLM(config).InitializeWeights();
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters())
        {
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) p.add_(randn_like(p) * 0.1);
            p.copy_(p.to_type(ScalarType.Float16).to_type(ScalarType.Float32));
        }
        foreach (var moe in model.MoeLayers())
            moe.gate.e_score_correction_bias.copy_((rand(config.NRoutedExperts) - 0.5) * 0.2);
        model.eval();
        return model;
    }

    public void Dispose()
    {
        Model.Dispose();
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { }
    }
}
