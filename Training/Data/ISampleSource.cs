// Where a trainer's samples come from, addressed by global index of the run's sample stream (DESIGN.md, Data plane).
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Data;

/// <summary>
/// Samples by global index g: the g-th sample the job consumes (epoch g / N, position g % N of the seeded
/// permutation). Step s of global batch G consumes [s·G, (s+1)·G); a data-parallel rank fetches only its part
/// (ParallelLayout.ReplicaSamples).
/// </summary>
public interface ISampleSource
{
    int SeqLen { get; }
    /// <summary>Samples in one epoch.</summary>
    long SampleCount { get; }
    /// <summary>int64 (count, SeqLen + 1) tensor of the samples at global indices [globalStart, globalStart + count).</summary>
    Tensor Fetch(long globalStart, int count);

    /// <summary>
    /// The global indices the fetches since the last call actually served, in the order served, adjacent ranges merged;
    /// then forgets them. What a worker reports to the exactly-once ledger for a step: the indices it trained on, as the
    /// source knows them (for the data service, the indices its replies carried), not what the step was meant to read.
    /// </summary>
    IReadOnlyList<SampleRange> TakeServed();
}

/// <summary>The served-index record of a sample source (<see cref="ISampleSource.TakeServed"/>).</summary>
public sealed class ServedRanges
{
    readonly List<SampleRange> ranges = [];
    readonly Lock gate = new();

    /// <summary>Global index <paramref name="index"/> was served: it extends the last range when it follows it.</summary>
    public void Add(long index) => Add(new SampleRange(index, 1));

    public void Add(SampleRange range)
    {
        if (range.Count == 0) return;
        lock (gate)
        {
            if (ranges.Count > 0 && ranges[^1].End == range.Start) ranges[^1] = ranges[^1] with { Count = ranges[^1].Count + range.Count };
            else ranges.Add(range);
        }
    }

    public IReadOnlyList<SampleRange> Take()
    {
        lock (gate)
        {
            var taken = ranges.ToArray();
            ranges.Clear();
            return taken;
        }
    }
}

/// <summary>An in-memory dataset read through the seeded per-epoch permutation.</summary>
public sealed class PermutedSamples(TokenDataset dataset, ulong seed) : ISampleSource
{
    readonly SamplePermutation permutation = new(dataset.SampleCount, seed);
    readonly ServedRanges served = new();

    public int SeqLen => dataset.SeqLen;
    public long SampleCount => dataset.SampleCount;

    public Tensor Fetch(long globalStart, int count)
    {
        var indices = new long[count];
        for (int i = 0; i < count; i++) indices[i] = permutation.SampleAt(globalStart + i);
        served.Add(new SampleRange(globalStart, count));
        return dataset.Batch(indices);
    }

    public IReadOnlyList<SampleRange> TakeServed() => served.Take();
}

/// <summary>An in-memory dataset in its own order, global index i the i-th sample (a validation split: no epochs, no shuffle).</summary>
public sealed class InOrderSamples(TokenDataset dataset) : ISampleSource
{
    readonly ServedRanges served = new();

    public int SeqLen => dataset.SeqLen;
    public long SampleCount => dataset.SampleCount;

    public Tensor Fetch(long globalStart, int count)
    {
        if (globalStart < 0 || globalStart + count > dataset.SampleCount)
            throw new ArgumentOutOfRangeException(nameof(globalStart), $"samples [{globalStart}, {globalStart + count}) are outside the {dataset.SampleCount} held");
        served.Add(new SampleRange(globalStart, count));
        return dataset.Batch([.. Enumerable.Range(0, count).Select(i => globalStart + i)]);
    }

    public IReadOnlyList<SampleRange> TakeServed() => served.Take();
}
