// Gradient sums under expert parallelism: replicated parameters over every rank, a routed expert's only over the ranks holding it.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>
/// Sums an <see cref="ExactGradientSum"/> whose parameters come replicated first and this rank's routed experts last
/// (<see cref="ExpertParallel.IsExpertParameter"/>; the optimizer orders them so): the first
/// <see cref="ReplicatedWords"/> words are all-reduced over the world, as without ep; the expert words are summed over
/// <see cref="ExpertParallel.ShardPeers"/> only (nothing to exchange when ep = dp). The words are integers, so both sums
/// are exact in any order and every holder of a shard ends with the same bits.
/// </summary>
public sealed class ExpertGradientReducer(BucketedGradientReducer inner, ExpertParallel experts, long replicatedWords) : IGradientReducer
{
    public long ReplicatedWords { get; } = replicatedWords;
    public BucketedGradientReducer Inner { get; } = inner;

    public void SumGradients(ExactGradientSum sum)
    {
        if (sum.Shards is not null) throw new InvalidOperationException("these words are laid out in ZeRO shards: ep with ZeRO sums through ExpertZeroStep, not this reducer");
        var collective = Inner.Collective;
        if (collective.WorldSize == 1) return;
        using var noGrad = no_grad();
        long perBucket = Math.Max(1, Inner.BucketBytes / sizeof(long));
        foreach (var words in new[] { sum.High, sum.Low })
        {
            for (long start = 0; start < ReplicatedWords; start += perBucket)
            {
                using var bucket = words.narrow(0, start, Math.Min(perBucket, ReplicatedWords - start));
                collective.AllReduce(bucket, ReduceOp.Sum);
            }
            using var expertWords = words.narrow(0, ReplicatedWords, words.numel() - ReplicatedWords);
            SumOverShardPeers(expertWords);
        }
        collective.AllReduce(sum.Worst, ReduceOp.Max);
    }

    /// <summary>
    /// An all-reduce among the holders of this shard, built from the all-to-all: each sends its words to every other
    /// holder (zero rows to everyone else) and adds what it receives, in rank order.
    /// </summary>
    void SumOverShardPeers(Tensor words)
    {
        var peers = experts.ShardPeers;
        if (peers.Count == 1 || words.numel() == 0) return;
        var collective = Inner.Collective;
        int world = collective.WorldSize;
        long n = words.numel();
        var rows = new long[world];
        foreach (var p in peers) rows[p] = n;
        using var scope = NewDisposeScope();
        var input = words.unsqueeze(0).expand(peers.Count, n).reshape(-1).contiguous();
        var output = empty(peers.Count * n, ScalarType.Int64, words.device);
        collective.AllToAll(input, rows, output, rows);
        words.copy_(output.view(peers.Count, n).sum(dim: 0)); // dim named: a literal 0 would bind to sum(ScalarType)
    }

    public void SumWords(long[] words) => Inner.SumWords(words);
}
