// Autoregressive sampling with the MLA latent cache: greedy, temperature and nucleus (top-p).
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public sealed record SamplingOptions
{
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>0 means greedy (argmax).</summary>
    public double Temperature { get; init; } = 0.0;
    public double TopP { get; init; } = 1.0;
    public long Seed { get; init; } = 0;
    /// <summary>Stops after emitting this token (not included in the output).</summary>
    public int? EosTokenId { get; init; }
    /// <summary>Recompute the whole sequence each step instead of using the cache (for checking the cache).</summary>
    public bool NoCache { get; init; }

    public bool Greedy => Temperature <= 0;
}

public static class TextGenerator
{
    /// <summary>Continues <paramref name="prompt"/> (at least one token) and returns the new tokens only.</summary>
    public static int[] Generate(DeepSeekForCausalLM model, IReadOnlyList<int> prompt, SamplingOptions options, Device? device = null)
    {
        if (prompt.Count == 0) throw new ArgumentException("the prompt must hold at least one token (encode some text, or start from the BOS token)");
        if (options.TopP is <= 0 or > 1) throw new ArgumentException($"top_p must be in (0, 1], got {options.TopP}");
        device ??= model.lm_head.weight!.device;
        using var hold = FinalizerHold.Enter();
        model.eval();
        using var noGrad = no_grad();
        using var cache = options.NoCache ? null : model.NewCache();
        var generator = new TorchSharp.torch.Generator((ulong)options.Seed); // sampling draws on the CPU, so results do not depend on the device
        var tokens = prompt.ToList();
        var produced = new List<int>();
        int maxPositions = model.Config.MaxPositionEmbeddings;
        for (int i = 0; i < options.MaxNewTokens && tokens.Count < maxPositions; i++)
        {
            using var scope = NewDisposeScope();
            // With the cache, only the tokens it has not seen yet are fed (the whole prompt first, then one at a time).
            var feed = cache is null ? tokens : tokens.Skip((int)cache.Length).ToList();
            var ids = tensor(feed.Select(t => (long)t).ToArray(), dtype: ScalarType.Int64, device: device).unsqueeze(0);
            var logits_V = model.Forward(ids, cache).Logits_BTV[0, -1].to_type(ScalarType.Float64);
            int next = options.Greedy ? (int)logits_V.argmax().item<long>() : Sample(logits_V, options, generator);
            if (next == options.EosTokenId) break;
            tokens.Add(next);
            produced.Add(next);
        }
        return produced.ToArray();
    }

    /// <summary>One draw from softmax(logits / temperature), cut to the top-p nucleus; the model server samples each request with it too.</summary>
    public static int Sample(Tensor logits_V, SamplingOptions options, TorchSharp.torch.Generator generator)
    {
        var probs = (logits_V / options.Temperature).softmax(-1);
        if (options.TopP < 1)
        {
            // Keep the smallest set of most likely tokens whose mass reaches top_p (the first token always stays).
            var (sorted, order) = probs.sort(descending: true);
            var before = sorted.cumsum(0) - sorted;
            sorted = sorted.masked_fill(before.ge(options.TopP), 0);
            probs = zeros_like(probs).scatter(0, order, sorted);
            probs = probs / probs.sum();
        }
        return (int)multinomial(probs.cpu(), 1, generator: generator).item<long>();
    }
}
