// The dp x pp (x ep, zero) layout: every rank's coordinates (stage, replica, expert shard, ZeRO shard), which samples a replica trains on, and the layout a checkpoint is saved from or loaded into.
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
/// head and the MTP layers (which sit after the last decoder layer). Within a stage, consecutive groups of
/// <see cref="Ep"/> replicas split the routed experts (expert shard = replica mod Ep), and with <see cref="Zero"/> &gt; 0
/// replica d holds ZeRO shard d: rows [d·n/Dp, (d+1)·n/Dp) of every tensor of its stage, the same rows it writes to a
/// checkpoint (ShardingPlan). This record is the one place those coordinates are computed.
/// </summary>
public sealed record ParallelLayout(
    [property: JsonPropertyName("dp")] int Dp,
    [property: JsonPropertyName("pp")] int Pp,
    [property: JsonPropertyName("stages")] IReadOnlyList<StageLayers> Stages)
{
    /// <summary>Expert-parallel width: replicas that split the routed experts among them (1: every replica holds all).</summary>
    [JsonPropertyName("ep")] public int Ep { get; init; } = 1;
    /// <summary>ZeRO stage: 0 replicated, 1 optimizer state sharded over Dp, 2 and the gradient sums, 3 and the parameters.</summary>
    [JsonPropertyName("zero")] public int Zero { get; init; }

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

    /// <summary>
    /// The layout with <paramref name="ep"/> expert shards and ZeRO stage <paramref name="zero"/>; ep must divide both dp
    /// and <paramref name="routedExperts"/> (an error names all three numbers).
    /// </summary>
    public ParallelLayout WithShards(int ep, int zero, int routedExperts)
    {
        if (ep < 1 || Dp % ep != 0 || (routedExperts > 0 && routedExperts % ep != 0))
            throw new ArgumentOutOfRangeException(nameof(ep), $"ep {ep} must be at least 1 and divide dp ({Dp}) and the routed experts ({routedExperts})");
        if (zero is < 0 or > 3) throw new ArgumentOutOfRangeException(nameof(zero), $"zero {zero}: expected 0, 1, 2 or 3");
        return (this with { Ep = ep, Zero = zero }).Validated();
    }

    /// <summary>Checks that the stages tile [0, NumLayers) in order, one per pipeline stage, and that ep divides dp.</summary>
    public ParallelLayout Validated()
    {
        if (Dp < 1) throw new InvalidDataException($"layout dp is {Dp}; expected at least 1");
        if (Ep < 1 || Dp % Ep != 0) throw new InvalidDataException($"layout ep is {Ep}; expected a divisor of dp {Dp}");
        if (Zero is < 0 or > 3) throw new InvalidDataException($"layout zero is {Zero}; expected 0 to 3");
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
    /// <summary>Which slice of the routed experts <paramref name="rank"/> holds: experts [shard·E/Ep, (shard+1)·E/Ep).</summary>
    public int ExpertShardOfRank(int rank) => ReplicaOfRank(rank) % Ep;
    /// <summary>The expert-parallel group of <paramref name="rank"/>'s stage: Ep consecutive replicas exchange tokens.</summary>
    public int ExpertGroupOfRank(int rank) => ReplicaOfRank(rank) / Ep;
    /// <summary>The ZeRO shard <paramref name="rank"/> updates (its replica), or -1 when nothing is sharded (zero 0).</summary>
    public int ZeroShardOfRank(int rank) => Zero > 0 ? ReplicaOfRank(rank) : -1;

    /// <summary>
    /// The rows of a tensor of shape <paramref name="shape"/> that <paramref name="rank"/> updates under ZeRO: a replicated
    /// tensor's shard of Dp (<see cref="ZeroRows"/>), or, for a routed expert's (<paramref name="expert"/>) under ep &gt; 1,
    /// its share among the Dp/Ep replicas that hold that expert (shard replica / Ep). Either way the rows it also writes to
    /// a checkpoint (ShardingPlan), so a ZeRO rank's optimizer state is its checkpoint slice.
    /// </summary>
    public (long Start, long Count) ZeroRowsOfRank(long[] shape, int rank, bool expert)
    {
        int replica = ReplicaOfRank(rank);
        if (!expert || Ep == 1) return ZeroRows(shape, replica);
        int holder = replica / Ep;
        return shape.Length == 0 ? (0, holder == 0 ? 1 : 0) : Split(shape[0], Dp / Ep, holder);
    }

    /// <summary>
    /// Rows [i·n/parts, (i+1)·n/parts) of a tensor of <paramref name="rows"/> rows: balanced, contiguous, covering [0, n)
    /// once over i. A ZeRO shard and a checkpoint writer's slice are both this split over the replicas.
    /// </summary>
    public static (long Start, long Count) Split(long rows, int parts, int index)
    {
        if (parts < 1 || index < 0 || index >= parts) throw new ArgumentOutOfRangeException(nameof(index), $"part {index} of {parts}: expected 0 <= part < parts");
        long start = rows * index / parts, end = rows * (index + 1) / parts;
        return (start, end - start);
    }

    /// <summary>The rows of a tensor of shape <paramref name="shape"/> that ZeRO shard <paramref name="shard"/> holds (a scalar: shard 0 only).</summary>
    public (long Start, long Count) ZeroRows(long[] shape, int shard) =>
        shape.Length == 0 ? (0, shard == 0 ? 1 : 0) : Split(shape[0], Dp, shard);

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

    /// <summary>Same dp, pp and stage boundaries (records compare lists by reference); ep and zero change no checkpoint file.</summary>
    public bool SameAs(ParallelLayout other) => Dp == other.Dp && Pp == other.Pp && Stages.SequenceEqual(other.Stages);
}

/// <summary>Global sample indices [<see cref="Start"/>, <see cref="Start"/> + <see cref="Count"/>) of the job's sample stream.</summary>
public readonly record struct SampleRange(long Start, int Count)
{
    public long End => Start + Count;
    public override string ToString() => $"[{Start}, {End})";
}
