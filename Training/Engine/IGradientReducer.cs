// What a trainer asks of its data-parallel group: exact integer sums over ranks; the standalone trainer has none.
namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// Sums a step's gradients and statistics over the data-parallel ranks. Every sum is of int64 words (or a Max), so it
/// is exact and the same in any order and over any number of ranks: the ranks end with the same bits, and so does a
/// job whatever world sizes it went through.
/// </summary>
public interface IGradientReducer
{
    /// <summary>Sums <paramref name="sum"/>'s words over ranks in place, and takes the largest of their <see cref="ExactGradientSum.Worst"/>.</summary>
    void SumGradients(ExactGradientSum sum);

    /// <summary>Sums <paramref name="words"/> over ranks in place (expert loads, loss words, micro-batch counts).</summary>
    void SumWords(long[] words);
}
