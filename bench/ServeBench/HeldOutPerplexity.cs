// Perplexity on the shipped corpus's held-out split (the split training uses): the quality cost of int8/int4.
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ServeBench;

public static class HeldOutPerplexity
{
    /// <summary>exp(mean next-token NLL) over <paramref name="windows"/> windows of <paramref name="length"/> tokens of the validation documents.</summary>
    public static double Measure(DeepSeekForCausalLM model, BpeTokenizer tokenizer, int windows, int length, double validationFraction = 0.05, int seed = 1234)
    {
        var (_, validation) = ShippedCorpus.Split(ShippedCorpus.Documents(), validationFraction, seed);
        var stream = validation.SelectMany(d => tokenizer.Encode(d, addSpecialTokens: true)).Take(windows * length).Select(t => (long)t).ToArray();
        if (stream.Length < length) throw new InvalidOperationException($"the held-out split holds only {stream.Length} tokens");
        model.eval();
        using var noGrad = no_grad();
        double nll = 0;
        long count = 0;
        for (int w = 0; w + length <= stream.Length; w += length)
        {
            using var scope = NewDisposeScope();
            var ids = tensor(stream.AsSpan(w, length).ToArray()).unsqueeze(0);
            var logp = model.Forward(ids).Logits_BTV[0].to_type(ScalarType.Float64).log_softmax(-1);
            var targets = ids[0].narrow(0, 1, length - 1);
            nll -= logp.narrow(0, 0, length - 1).gather(1, targets.unsqueeze(1)).sum().item<double>();
            count += length - 1;
        }
        return Math.Exp(nll / count);
    }
}
