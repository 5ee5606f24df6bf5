// What every evaluation task reduces to: log P(continuation | context) for token sequences, and whether the
// continuation is the greedy one. The interface a test can implement; ModelScorer is the real model's.
namespace DeepSeekCluster.Training.Harness;

/// <summary>
/// One scoring request: the continuation's tokens after the context's. The context is never empty (a document
/// starts after the end-of-text token the trainer joins documents with).
/// </summary>
public sealed record LoglikelihoodRequest(int[] Context, int[] Continuation)
{
    /// <summary>Tokens the model reads: context and continuation, less the last token (nothing predicts after it).</summary>
    public int InputLength => Context.Length + Continuation.Length - 1;
}

/// <summary>Sum of the continuation tokens' log-probabilities (nats), and whether each was the argmax.</summary>
public readonly record struct Loglikelihood(double LogProb, bool IsGreedy);

public interface ILoglikelihoodScorer
{
    /// <summary>The longest input the scorer reads; longer contexts are cut from the left.</summary>
    int MaxLength { get; }

    /// <summary>One result per request, in the order given.</summary>
    IReadOnlyList<Loglikelihood> Score(IReadOnlyList<LoglikelihoodRequest> requests);
}
