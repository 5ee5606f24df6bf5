// A token stream cut into fixed-length training samples of SeqLen + 1 tokens (inputs plus the
// shifted targets), and batches of them as int64 tensors. Not a tokenizer, not a sampler.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Data;

/// <summary>
/// Sample i is tokens [i·SeqLen, i·SeqLen + SeqLen + 1): consecutive samples share one token, so
/// every token but the first is a target exactly once (the nanoGPT layout). The tail shorter than
/// a sample is dropped.
/// </summary>
public sealed class TokenDataset
{
    private readonly int[] _tokens;

    public TokenDataset(int[] tokens, int seqLen)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        if (seqLen < 1)
            throw new ArgumentOutOfRangeException(nameof(seqLen), seqLen, "The sequence length must be at least 1.");
        _tokens = tokens;
        SeqLen = seqLen;
        SampleCount = Math.Max(0, (tokens.LongLength - 1) / seqLen);
    }

    /// <summary>Tokens per sample that the model sees as input; a sample holds one more.</summary>
    public int SeqLen { get; }

    public long SampleCount { get; }

    public long TokenCount => _tokens.LongLength;

    /// <summary>
    /// Joins the documents into one stream, each followed by <paramref name="eotId"/>
    /// ("doc₀ EOT doc₁ EOT …"), so a sample that spans a boundary sees where a document ends.
    /// </summary>
    public static TokenDataset Pack(IEnumerable<int[]> encodedDocs, int eotId, int seqLen)
    {
        ArgumentNullException.ThrowIfNull(encodedDocs);
        var tokens = new List<int>();
        foreach (int[] doc in encodedDocs)
        {
            tokens.AddRange(doc);
            tokens.Add(eotId);
        }
        return new TokenDataset(tokens.ToArray(), seqLen);
    }

    /// <summary>The SeqLen + 1 tokens of sample <paramref name="index"/>.</summary>
    public ReadOnlySpan<int> Sample(long index)
    {
        CheckIndex(index);
        return _tokens.AsSpan(checked((int)(index * SeqLen)), SeqLen + 1);
    }

    /// <summary>The samples, in the given order, as an int64 tensor on the CPU.</summary>
    public Tensor Batch(IReadOnlyList<long> sampleIndices)
    {
        ArgumentNullException.ThrowIfNull(sampleIndices);
        int width = SeqLen + 1;
        var batch = new long[checked(sampleIndices.Count * width)];
        for (int b = 0; b < sampleIndices.Count; b++)
        {
            ReadOnlySpan<int> sample = Sample(sampleIndices[b]);
            for (int t = 0; t < width; t++)
                batch[b * width + t] = sample[t];
        }
        return torch.tensor(batch, [sampleIndices.Count, width], ScalarType.Int64); // (B, SeqLen+1)
    }

    private void CheckIndex(long index)
    {
        if (index < 0 || index >= SampleCount)
            throw new ArgumentOutOfRangeException(nameof(index), index,
                $"Sample index must be in [0, {SampleCount}).");
    }
}
