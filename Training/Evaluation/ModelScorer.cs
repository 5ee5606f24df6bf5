// The real model's log-likelihoods: one forward pass per batch of requests, right-padded (a causal model's earlier
// positions never see the padding). Not a batch planner: EvalPlan decides which requests share a batch.
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Harness;

public sealed class ModelScorer(DeepSeekForCausalLM model, Device device, int? maxLength = null) : ILoglikelihoodScorer
{
    public int MaxLength { get; } = maxLength ?? model.Config.MaxPositionEmbeddings;

    /// <summary>Input tokens read so far (padding excluded): the throughput measure of the benchmark and the metrics.</summary>
    public long TokensScored { get; private set; }

    /// <summary>Scores all <paramref name="requests"/> in one forward pass: the caller sizes the batch.</summary>
    public IReadOnlyList<Loglikelihood> Score(IReadOnlyList<LoglikelihoodRequest> requests)
    {
        if (requests.Count == 0) return [];
        using var hold = FinalizerHold.Enter();
        model.eval();
        try
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            var inputs = requests.Select(Input).ToList();
            int B = inputs.Count, T = inputs.Max(i => i.Ids.Length);
            var ids = new long[B * T];
            var targets = new long[B * T];
            var mask = new bool[B * T];
            for (int b = 0; b < B; b++)
            {
                var (input, cont) = inputs[b];
                for (int t = 0; t < input.Length; t++) ids[b * T + t] = input[t];
                // Position p predicts token p+1: the continuation's tokens are predicted by the last cont.Length positions.
                int first = input.Length - cont.Length;
                for (int c = 0; c < cont.Length; c++) { targets[b * T + first + c] = cont[c]; mask[b * T + first + c] = true; }
                TokensScored += input.Length;
            }
            var ids_BT = tensor(ids, [B, T], ScalarType.Int64).to(device);
            var target_BT = tensor(targets, [B, T], ScalarType.Int64).to(device);
            var mask_BT = tensor(mask, [B, T]).to(device);
            var logits_BTV = model.Forward(ids_BT).Logits_BTV.to_type(ScalarType.Float32);
            var logp_BT = logits_BTV.log_softmax(-1).gather(-1, target_BT.unsqueeze(-1)).squeeze(-1).to_type(ScalarType.Float64);
            var sum_B = logp_BT.where(mask_BT, 0.0).sum(1).cpu();
            var greedy_B = logits_BTV.argmax(-1).eq(target_BT).logical_or(mask_BT.logical_not()).all(1).cpu();
            var sums = sum_B.data<double>().ToArray();
            var greedy = greedy_B.data<bool>().ToArray();
            return Enumerable.Range(0, B).Select(b => new Loglikelihood(sums[b], greedy[b])).ToList();
        }
        finally { model.train(); }
    }

    /// <summary>The tokens read (context + continuation less its last token, cut from the left to MaxLength).</summary>
    (int[] Ids, int[] Cont) Input(LoglikelihoodRequest r)
    {
        if (r.Context.Length == 0) throw new ArgumentException("a request's context must hold at least one token");
        if (r.Continuation.Length == 0) throw new ArgumentException("a request's continuation must hold at least one token");
        if (r.Continuation.Length > MaxLength)
            throw new ArgumentException($"a continuation of {r.Continuation.Length} tokens is longer than the scorer's {MaxLength}-token window");
        var all = r.Context.Concat(r.Continuation).ToArray();
        var input = all[..^1];
        if (input.Length > MaxLength) input = input[^MaxLength..];
        return (input, r.Continuation);
    }
}
