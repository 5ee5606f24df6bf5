// Which rank writes which rows of which tensor for a layout, and which rows a rank needs when it loads.
using DeepSeekCluster.Training.Parallel;
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>A checkpoint tensor's name, safetensors dtype and full shape.</summary>
public sealed record TensorEntry(string Name, string Dtype, long[] Shape)
{
    public long Rows => Shape.Length == 0 ? 1 : Shape[0];
}

/// <summary>Rows [<see cref="RowStart"/>, +<see cref="RowCount"/>) along dim 0 of tensor <see cref="Name"/> (a scalar has one row).</summary>
public sealed record TensorSlice(string Name, long RowStart, long RowCount)
{
    public long RowEnd => RowStart + RowCount;
}

/// <summary>
/// Pipeline stage s owns the tensors of its layers (stage 0 also the embedding, the last stage the final norm, the head
/// and the MTP layers), including their <c>optimizer.*</c> state. Within a stage, replica d writes rows
/// [d·n/Dp, (d+1)·n/Dp) of each owned tensor, so the ranks write disjoint parts that together cover every tensor
/// exactly once, and each rank writes about 1/world of the bytes. A tensor with fewer rows than Dp leaves some
/// replicas nothing to write for it.
/// </summary>
public sealed class ShardingPlan
{
    static readonly Regex LayerIndex = new(@"^(?:optimizer\.)?model\.layers\.(\d+)\.", RegexOptions.Compiled);
    const string OptimizerPrefix = "optimizer.";
    /// <summary>A routed expert's tensor (or its optimizer state): group 1 is the expert's index.</summary>
    internal static readonly Regex ExpertIndex = new(@"\.mlp\.experts\.(\d+)\.", RegexOptions.Compiled);
    readonly int expertsPerShard;

    public ParallelLayout Layout { get; }
    public IReadOnlyList<TensorEntry> Tensors { get; }
    readonly Dictionary<string, TensorEntry> byName;

    public ShardingPlan(ParallelLayout layout, IEnumerable<TensorEntry> tensors)
    {
        Layout = layout.Validated();
        Tensors = tensors.ToList();
        byName = new Dictionary<string, TensorEntry>(StringComparer.Ordinal);
        foreach (var t in Tensors)
            if (!byName.TryAdd(t.Name, t)) throw new ArgumentException($"tensor '{t.Name}' appears twice in the checkpoint catalog");
        int experts = Tensors.Select(t => ExpertOf(t.Name)).Where(e => e >= 0).Distinct().Count();
        if (experts % Layout.Ep != 0) throw new ArgumentException($"ep {Layout.Ep} does not divide the catalog's {experts} routed experts");
        expertsPerShard = experts / Layout.Ep;
    }

    public static ShardingPlan For(ParallelLayout layout, CheckpointManifest manifest) =>
        new(layout, manifest.Tensors.Select(kv => new TensorEntry(kv.Key, kv.Value.Dtype, kv.Value.Shape)));

    public TensorEntry Entry(string name) =>
        byName.TryGetValue(name, out var e) ? e : throw new KeyNotFoundException($"tensor '{name}' is not in the checkpoint");

    public static string FileOf(int rank) => $"rank-{rank}.safetensors";

    public static bool IsOptimizerState(string name) => name.StartsWith(OptimizerPrefix, StringComparison.Ordinal);

    /// <summary>The pipeline stage that owns <paramref name="name"/> (an <c>optimizer.</c> name follows its parameter).</summary>
    public int StageOf(string name)
    {
        var m = LayerIndex.Match(name);
        if (m.Success)
        {
            int layer = int.Parse(m.Groups[1].Value);
            for (int s = 0; s < Layout.Pp; s++)
                if (layer < Layout.Stages[s].End) return s;
            return Layout.Pp - 1; // MTP layers come after the last decoder layer
        }
        string param = IsOptimizerState(name) ? name[OptimizerPrefix.Length..] : name;
        return param.StartsWith("model.embed_tokens.", StringComparison.Ordinal) ? 0 : Layout.Pp - 1;
    }

    /// <summary>The routed expert <paramref name="name"/> belongs to, or -1.</summary>
    public static int ExpertOf(string name) => ExpertIndex.Match(name) is { Success: true } m ? int.Parse(m.Groups[1].Value) : -1;

    /// <summary>
    /// The rows <paramref name="rank"/> writes of <paramref name="t"/>: its replica's share, or, for a routed expert under
    /// ep, nothing unless its shard holds the expert and then its share among the dp/ep replicas holding it.
    /// </summary>
    (long Start, long Count) WriteRows(TensorEntry t, int rank)
    {
        int replica = Layout.ReplicaOfRank(rank), parts = Layout.Dp;
        if (Layout.Ep > 1 && ExpertOf(t.Name) is var e and >= 0)
        {
            if (e / expertsPerShard != Layout.ExpertShardOfRank(rank)) return (0, 0);
            (replica, parts) = (replica / Layout.Ep, Layout.Dp / Layout.Ep);
        }
        return t.Shape.Length == 0 ? (0L, replica == 0 ? 1L : 0L) : Split(t.Rows, parts, replica);
    }

    /// <summary>Rows [i·n/parts, (i+1)·n/parts): balanced, contiguous, and covering [0, n) once over i.</summary>
    public static (long Start, long Count) Split(long rows, int parts, int index) => ParallelLayout.Split(rows, parts, index);

    /// <summary>The slices <paramref name="rank"/> writes, in catalog order; none of zero rows.</summary>
    public IReadOnlyList<TensorSlice> WritesOf(int rank)
    {
        CheckRank(rank);
        int stage = Layout.StageOfRank(rank);
        var result = new List<TensorSlice>();
        foreach (var t in Tensors)
        {
            if (StageOf(t.Name) != stage) continue;
            var (start, count) = WriteRows(t, rank);
            if (count > 0) result.Add(new TensorSlice(t.Name, start, count));
        }
        return result;
    }

    /// <summary>
    /// What <paramref name="rank"/> must load: its stage's model tensors whole (every replica computes with all of
    /// them), and its stage's optimizer state whole, or only its own rows when <paramref name="shardOptimizer"/>
    /// (ZeRO-1: each replica updates 1/Dp of the rows).
    /// </summary>
    public IReadOnlyList<TensorSlice> NeedsOf(int rank, bool shardOptimizer)
    {
        CheckRank(rank);
        int stage = Layout.StageOfRank(rank), replica = Layout.ReplicaOfRank(rank);
        var result = new List<TensorSlice>();
        foreach (var t in Tensors)
        {
            if (StageOf(t.Name) != stage) continue;
            var (start, count) = shardOptimizer && IsOptimizerState(t.Name) && t.Shape.Length > 0 ? Split(t.Rows, Layout.Dp, replica) : (0L, t.Rows);
            if (count > 0) result.Add(new TensorSlice(t.Name, start, count));
        }
        return result;
    }

    /// <summary>The manifest's tensor map: every tensor with the slices all ranks write, ordered by row.</summary>
    public Dictionary<string, ManifestTensor> ManifestTensors()
    {
        var slices = Tensors.ToDictionary(t => t.Name, _ => new List<ManifestSlice>(), StringComparer.Ordinal);
        for (int r = 0; r < Layout.WorldSize; r++)
            foreach (var s in WritesOf(r)) slices[s.Name].Add(new ManifestSlice(FileOf(r), s.RowStart, s.RowCount));
        return Tensors.ToDictionary(t => t.Name,
            t => new ManifestTensor(t.Dtype, t.Shape, slices[t.Name].OrderBy(s => s.RowStart).ToList()), StringComparer.Ordinal);
    }

    void CheckRank(int rank)
    {
        if (rank < 0 || rank >= Layout.WorldSize)
            throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside the layout's {Layout.WorldSize} ranks (dp {Layout.Dp} x pp {Layout.Pp})");
    }
}
