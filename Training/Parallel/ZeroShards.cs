// Where each ZeRO shard's rows of every parameter sit in a shard-major flat buffer (gradient words, gathered parameters).
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>
/// The ZeRO partition of a list of parameters over <see cref="Shards"/> replicas. Shard d holds rows
/// <see cref="ParallelLayout.ZeroRows"/> of every parameter (the rows it also writes to a checkpoint), so a parameter's
/// rows of shard d are one contiguous run of its flattened elements. A flat buffer of <see cref="TotalWords"/> elements
/// is laid out shard-major: shard d's runs, in parameter order, fill [d·<see cref="ShardWords"/>, (d+1)·ShardWords),
/// padded to the longest shard, so that a reduce-scatter (or an all-gather) of equal parts moves exactly each shard's rows.
/// </summary>
public sealed class ZeroShards
{
    /// <summary>Elements [<see cref="Element"/>, +<see cref="Count"/>) of parameter <see cref="Param"/> (flattened), at <see cref="Word"/> in the flat buffer.</summary>
    public readonly record struct Piece(int Param, int Shard, long Element, long Count, long Word);

    public int Shards { get; }
    /// <summary>Elements of the longest shard: every shard's region of the flat buffer has this length.</summary>
    public long ShardWords { get; }
    public long TotalWords => ShardWords * Shards;
    /// <summary>Elements of all parameters together (the buffer's unpadded content).</summary>
    public long Elements { get; }
    public IReadOnlyList<long[]> Shapes { get; }

    readonly Piece[][] byParam;  // [param][shard]
    readonly Piece[][] byShard;  // [shard][param]
    readonly (long Start, long Count)[][] rows; // [param][shard]

    public ZeroShards(ParallelLayout layout, IReadOnlyList<long[]> shapes)
    {
        Shards = layout.Dp;
        Shapes = shapes;
        byParam = new Piece[shapes.Count][];
        rows = new (long, long)[shapes.Count][];
        var local = new long[Shards];
        var pieces = new List<Piece>[Shards];
        for (int d = 0; d < Shards; d++) pieces[d] = [];
        var placed = new List<(int Param, int Shard, long Element, long Count, long Local)>();
        for (int i = 0; i < shapes.Count; i++)
        {
            long numel = shapes[i].Aggregate(1L, (a, b) => a * b);
            long rowCount = shapes[i].Length == 0 ? 1 : shapes[i][0];
            long rowSize = rowCount == 0 ? 0 : numel / rowCount;
            Elements += numel;
            rows[i] = new (long, long)[Shards];
            for (int d = 0; d < Shards; d++)
            {
                var (start, count) = layout.ZeroRows(shapes[i], d);
                rows[i][d] = (start, count);
                placed.Add((i, d, start * rowSize, count * rowSize, local[d]));
                local[d] += count * rowSize;
            }
        }
        ShardWords = Math.Max(1, local.Max());
        foreach (var p in placed)
        {
            var piece = new Piece(p.Param, p.Shard, p.Element, p.Count, p.Shard * ShardWords + p.Local);
            (byParam[p.Param] ??= new Piece[Shards])[p.Shard] = piece;
            pieces[p.Shard].Add(piece);
        }
        byShard = pieces.Select(l => l.ToArray()).ToArray();
    }

    /// <summary>Parameter <paramref name="param"/>'s run of every shard, in shard order (together: all its elements).</summary>
    public IReadOnlyList<Piece> PiecesOf(int param) => byParam[param];
    /// <summary>Shard <paramref name="shard"/>'s run of every parameter, in parameter order (some may be empty).</summary>
    public IReadOnlyList<Piece> ShardPieces(int shard) => byShard[shard];
    /// <summary>The rows of parameter <paramref name="param"/> that shard <paramref name="shard"/> holds.</summary>
    public (long Start, long Count) Rows(int param, int shard) => rows[param][shard];

    /// <summary>
    /// The parts of shard <paramref name="shard"/>'s runs that fall in columns [<paramref name="column"/>, +<paramref name="width"/>)
    /// of its region: (piece, offset into the piece, length, offset into the window).
    /// </summary>
    public IEnumerable<(Piece Piece, long From, long Length, long At)> Window(int shard, long column, long width)
    {
        long regionStart = shard * ShardWords, lo = regionStart + column, hi = lo + width;
        foreach (var p in byShard[shard])
        {
            long start = Math.Max(lo, p.Word), end = Math.Min(hi, p.Word + p.Count);
            if (start < end) yield return (p, start - p.Word, end - start, start - lo);
        }
    }

    /// <summary>
    /// Columns [<paramref name="column"/>, +<paramref name="width"/>) of every shard's region, shard-major, copied into
    /// <paramref name="window"/> (Shards·width elements, zeroed first) from the flattened <paramref name="flats"/> (one per
    /// parameter; null adds nothing): what a windowed reduce-scatter of gradient words converts. Call inside a dispose scope.
    /// </summary>
    public void FillWindow(Tensor window, IReadOnlyList<Tensor?> flats, long column, long width)
    {
        window.zero_();
        for (int d = 0; d < Shards; d++)
            foreach (var (piece, from, length, at) in Window(d, column, width))
                if (flats[piece.Param] is { } g) window.narrow(0, d * width + at, length).copy_(g.narrow(0, piece.Element + from, length));
    }
}
