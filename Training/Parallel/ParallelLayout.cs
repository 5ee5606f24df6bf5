// The data-parallel x pipeline-parallel layout: which rank holds which stage, which samples a replica trains on, and the layout a checkpoint is saved from or loaded into.
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Training.Parallel;

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

    /// <summary>
    /// The samples replica <paramref name="replica"/> of <paramref name="replicas"/> trains on in the step that follows
    /// <paramref name="completedSteps"/> completed steps: its contiguous share of that step's global batch,
    /// [s·G + replica·G/replicas, + G/replicas). Every stage of a replica trains on the same share. The one place the
    /// trainers and the worker's step report learn a rank's samples from.
    /// </summary>
    public static SampleRange ReplicaSamples(long completedSteps, int globalBatch, int replica, int replicas)
    {
        if (replicas < 1 || globalBatch % replicas != 0)
            throw new ArgumentOutOfRangeException(nameof(replicas), $"{replicas} replicas must divide the global batch {globalBatch}");
        if (replica < 0 || replica >= replicas) throw new ArgumentOutOfRangeException(nameof(replica), $"replica {replica} is not in [0, {replicas})");
        int share = globalBatch / replicas;
        return new SampleRange(completedSteps * globalBatch + (long)replica * share, share);
    }

    /// <summary>Same degrees and stage boundaries (records compare lists by reference).</summary>
    public bool SameAs(ParallelLayout other) => Dp == other.Dp && Pp == other.Pp && Stages.SequenceEqual(other.Stages);
}

/// <summary>Global sample indices [<see cref="Start"/>, <see cref="Start"/> + <see cref="Count"/>) of the job's sample stream.</summary>
public readonly record struct SampleRange(long Start, int Count)
{
    public long End => Start + Count;
    public override string ToString() => $"[{Start}, {End})";
}
