// The data-parallel x pipeline-parallel layout a checkpoint is saved from or loaded into; not a process-group factory.
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>Decoder layers [<see cref="FirstLayer"/>, <see cref="FirstLayer"/> + <see cref="LayerCount"/>) held by one pipeline stage.</summary>
public sealed record StageLayers(
    [property: JsonPropertyName("first_layer")] int FirstLayer,
    [property: JsonPropertyName("layer_count")] int LayerCount)
{
    [JsonIgnore] public int End => FirstLayer + LayerCount;
}

/// <summary>
/// <see cref="Dp"/> data-parallel replicas of <see cref="Pp"/> pipeline stages. Ranks are stage-major:
/// rank = stage × Dp + replica. Stage 0 also owns the embedding; the last stage owns the final norm, the output
/// head and the MTP layers (which sit after the last decoder layer).
/// </summary>
public sealed record ParallelLayout(
    [property: JsonPropertyName("dp")] int Dp,
    [property: JsonPropertyName("pp")] int Pp,
    [property: JsonPropertyName("stages")] IReadOnlyList<StageLayers> Stages)
{
    [JsonIgnore] public int WorldSize => Dp * Pp;
    [JsonIgnore] public int NumLayers => Stages[^1].End;

    /// <summary><paramref name="numLayers"/> decoder layers split as evenly as possible, earlier stages taking the remainder.</summary>
    public static ParallelLayout Even(int dp, int pp, int numLayers)
    {
        if (dp < 1) throw new ArgumentOutOfRangeException(nameof(dp), $"data-parallel width {dp}: expected at least 1");
        if (pp < 1 || pp > numLayers)
            throw new ArgumentOutOfRangeException(nameof(pp), $"{pp} pipeline stages for {numLayers} layers: expected 1 to {numLayers}");
        var stages = new List<StageLayers>();
        int first = 0;
        for (int s = 0; s < pp; s++)
        {
            int count = numLayers / pp + (s < numLayers % pp ? 1 : 0);
            stages.Add(new StageLayers(first, count));
            first += count;
        }
        return new ParallelLayout(dp, pp, stages).Validated();
    }

    /// <summary>Checks that the stages tile [0, NumLayers) in order, one per pipeline stage.</summary>
    public ParallelLayout Validated()
    {
        if (Dp < 1) throw new InvalidDataException($"layout dp is {Dp}; expected at least 1");
        if (Stages is null || Stages.Count != Pp)
            throw new InvalidDataException($"layout has pp {Pp} but {Stages?.Count ?? 0} stage entries");
        int next = 0;
        for (int s = 0; s < Pp; s++)
        {
            if (Stages[s].FirstLayer != next || Stages[s].LayerCount < 1)
                throw new InvalidDataException($"layout stage {s} holds layers [{Stages[s].FirstLayer}, {Stages[s].End}); expected a non-empty range starting at {next}");
            next = Stages[s].End;
        }
        return this;
    }

    public int StageOfRank(int rank) => rank / Dp;
    public int ReplicaOfRank(int rank) => rank % Dp;
    public int Rank(int stage, int replica) => stage * Dp + replica;

    /// <summary>Same degrees and stage boundaries (records compare lists by reference).</summary>
    public bool SameAs(ParallelLayout other) => Dp == other.Dp && Pp == other.Pp && Stages.SequenceEqual(other.Stages);
}
