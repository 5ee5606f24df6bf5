// One accepted request as the engine sees it: token ids in, a stream of sampled tokens out. No HTTP, no text.
using System.Diagnostics;
using System.Threading.Channels;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.ModelServer.Engine;

public abstract record GenerationEvent;

/// <param name="Logprob">log softmax of the model's logits (temperature 1) at the chosen token.</param>
/// <param name="Top">The most likely alternatives with their log-probabilities, when the request asked for them.</param>
public sealed record TokenEvent(int Token, double Logprob, IReadOnlyList<(int Token, double Logprob)>? Top) : GenerationEvent;

/// <param name="Reason">"stop" (end-of-sequence token), "length" (max_tokens or the context) or "cancelled".</param>
public sealed record FinishedEvent(string Reason) : GenerationEvent;

public sealed record FailedEvent(Exception Error) : GenerationEvent;

public sealed class GenerationRequest
{
    public GenerationRequest(int[] prompt, int maxTokens, SamplingOptions sampling, int topLogprobs, int? eosTokenId, CancellationToken cancellation)
    {
        if (prompt.Length == 0) throw new ArgumentException("the prompt must hold at least one token");
        Prompt = prompt;
        MaxTokens = maxTokens;
        Sampling = sampling;
        TopLogprobs = topLogprobs;
        EosTokenId = eosTokenId;
        Cancellation = cancellation;
        Generator = new TorchSharp.torch.Generator((ulong)sampling.Seed);
    }

    public int[] Prompt { get; }
    public int MaxTokens { get; }
    public SamplingOptions Sampling { get; }
    /// <summary>-1: no log-probabilities; 0: the chosen token's only; k: also the k most likely tokens.</summary>
    public int TopLogprobs { get; }
    public int? EosTokenId { get; }
    public CancellationToken Cancellation { get; }
    /// <summary>Added to the logits before the token is chosen (OpenAI's logit_bias); the reported log-probabilities stay the model's.</summary>
    public IReadOnlyDictionary<int, double> LogitBias { get; init; } = new Dictionary<int, double>();

    /// <summary>Written by the engine thread only; the API reads until the channel completes.</summary>
    public Channel<GenerationEvent> Events { get; } = Channel.CreateUnbounded<GenerationEvent>(new UnboundedChannelOptions { SingleWriter = true });

    public long EnqueuedAt { get; } = Stopwatch.GetTimestamp();
    /// <summary>Stopwatch timestamps the engine sets: the first token sampled, the request finished (0 until then).</summary>
    public long FirstTokenAt { get; internal set; }
    public long FinishedAt { get; internal set; }

    // ---- Engine state (engine thread only) ----
    internal TorchSharp.torch.Generator Generator { get; }
    internal int[]? Blocks;
    internal long Cached;                 // tokens whose latents are in the pool
    internal int Produced;
    internal int Pending = -1;            // the last sampled token, fed at the next decode step
    internal long LastTokenAt;
}
