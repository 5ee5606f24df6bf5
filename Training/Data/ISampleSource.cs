// Where a trainer's samples come from, addressed by global index of the run's sample stream (DESIGN.md, Data plane).
using DeepSeekCluster.Text.Data;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Data;

/// <summary>
/// Samples by global index g: the g-th sample the job consumes (epoch g / N, position g % N of the seeded
/// permutation). Step s of global batch G consumes [s·G, (s+1)·G); a data-parallel rank fetches only its part.
/// </summary>
public interface ISampleSource
{
    int SeqLen { get; }
    /// <summary>Samples in one epoch.</summary>
    long SampleCount { get; }
    /// <summary>int64 (count, SeqLen + 1) tensor of the samples at global indices [globalStart, globalStart + count).</summary>
    Tensor Fetch(long globalStart, int count);
}

/// <summary>An in-memory dataset read through the seeded per-epoch permutation.</summary>
public sealed class PermutedSamples(TokenDataset dataset, ulong seed) : ISampleSource
{
    readonly SamplePermutation permutation = new(dataset.SampleCount, seed);

    public int SeqLen => dataset.SeqLen;
    public long SampleCount => dataset.SampleCount;

    public Tensor Fetch(long globalStart, int count)
    {
        var indices = new long[count];
        for (int i = 0; i < count; i++) indices[i] = permutation.SampleAt(globalStart + i);
        return dataset.Batch(indices);
    }
}
