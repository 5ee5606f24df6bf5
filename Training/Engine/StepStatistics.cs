// What a step sums besides gradients: expert loads and the loss sums, all exchanged as int64 words in one call.
namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// A step's per-layer expert loads (token counts) and its LM, MTP and auxiliary loss sums over micro-batches, exact
/// (<see cref="ExactScalarSum"/>), so the routing-bias update and the reported loss are the same on every rank and at
/// any world size. <see cref="SumOver"/> makes them the sums over every rank's micro-batches.
/// </summary>
public sealed class StepStatistics
{
    public List<long[]> Loads { get; }
    public ExactScalarSum Lm, Mtp, Aux;

    public StepStatistics(IEnumerable<int> expertsPerLayer) => Loads = [.. expertsPerLayer.Select(e => new long[e])];

    public void AddLoads(IReadOnlyList<long[]> layerLoads)
    {
        for (int l = 0; l < Loads.Count; l++)
            for (int e = 0; e < Loads[l].Length; e++) Loads[l][e] += layerLoads[l][e];
    }

    /// <summary>Sums everything over the ranks of <paramref name="reducer"/> (in place, one exchange); null: this rank alone.</summary>
    public void SumOver(IGradientReducer? reducer)
    {
        if (reducer is null) return;
        long[] words = [.. Loads.SelectMany(l => l), .. Lm.Words, .. Mtp.Words, .. Aux.Words];
        reducer.SumWords(words);
        int i = 0;
        foreach (var l in Loads) for (int e = 0; e < l.Length; e++) l[e] = words[i++];
        Lm = ExactScalarSum.FromWords(words.AsSpan(i, 3));
        Mtp = ExactScalarSum.FromWords(words.AsSpan(i + 3, 3));
        Aux = ExactScalarSum.FromWords(words.AsSpan(i + 6, 3));
    }
}
