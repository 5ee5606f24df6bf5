// The micro model and corpus the trainers' equality tests share (ZeRO, expert parallelism, pipeline, recompute): dense
// and MoE layers, q and kv LoRA, an MTP module and the sequence balance loss, at a size float64 trains in seconds.
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.Training.Tests.Parallel;

public static class MicroModel
{
    public const int SeqLen = 16;

    public static DeepSeekConfig Config(int vocab, int layers = 3) => DeepSeekConfig.Tiny(vocab) with
    {
        HiddenSize = 32, IntermediateSize = 64, MoeIntermediateSize = 16, NumHiddenLayers = layers, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 16, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 8, AuxLossAlpha = 0.01,
    };

    /// <summary>The first 40 shipped documents under a 300-token BPE trained on them, packed into SeqLen-token samples.</summary>
    public static readonly Lazy<(int Vocab, TokenDataset Train)> Data = new(() =>
    {
        var docs = ShippedCorpus.Documents().Take(40).ToList();
        var tok = BpeTokenizer.Train(docs, 300);
        return (tok.VocabSize, TokenDataset.Pack(docs.Select(d => tok.Encode(d)), tok.EosTokenId!.Value, SeqLen));
    });
}
