// Writes a rank's share of a checkpoint (its row slices of model, routing-bias and optimizer tensors) and builds the manifest.
using DeepSeekCluster.Training.Parallel;
using System.Runtime.InteropServices;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>One rank's slices copied to host memory at a step boundary; owns the copies.</summary>
public sealed class HostSnapshot(long step, int rank, List<KeyValuePair<string, Tensor>> slices) : IDisposable
{
    public long Step { get; } = step;
    public int Rank { get; } = rank;
    public IReadOnlyList<KeyValuePair<string, Tensor>> Slices => slices;
    public long Bytes => slices.Sum(kv => kv.Value.numel() * kv.Value.ElementSize);

    /// <summary>Hands the copies to the next snapshot, which refills them; this one is empty afterwards.</summary>
    internal List<KeyValuePair<string, Tensor>> TakeSlices()
    {
        var taken = new List<KeyValuePair<string, Tensor>>(slices);
        slices.Clear();
        return taken;
    }

    public void Dispose()
    {
        foreach (var kv in slices) kv.Value.Dispose();
        slices.Clear();
    }
}

public static class ShardedCheckpointWriter
{
    /// <summary>
    /// Copies the rows <paramref name="rank"/> writes (per <paramref name="plan"/>) to CPU tensors that belong to no
    /// dispose scope, so they survive the training step's scope and can be written on another thread. With
    /// <paramref name="reuse"/> (the previous snapshot, whose write has finished) its tensors of the same name, shape
    /// and dtype are refilled in place, so a periodic save allocates and faults in its host memory once; the others are
    /// disposed and replaced. The result owns every tensor, <paramref name="reuse"/> none; on failure all are disposed.
    /// Copies of GPU tensors go to pinned memory where the runtime grants it (a faster device-to-host copy).
    /// </summary>
    public static HostSnapshot CopyToHost(ShardingPlan plan, int rank, long step, IReadOnlyDictionary<string, Tensor> tensors, HostSnapshot? reuse = null)
    {
        using var copy = new HostCopy(plan, rank, step, tensors, reuse);
        copy.Help();
        return copy.Take();
    }

    /// <summary>
    /// An uninitialised contiguous CPU tensor shaped like <paramref name="like"/>, outside any dispose scope; pinned when
    /// <paramref name="like"/> is on a GPU.
    /// </summary>
    internal static Tensor NewHostBuffer(Tensor like) => NewHostBuffer(like.shape, like.dtype, pinned: like.device_type == DeviceType.CUDA);

    /// <summary>
    /// An uninitialised contiguous CPU tensor outside any dispose scope, pinned if asked. Pinning is page-locking host
    /// memory, which the OS may refuse (a locked-memory limit): then the copy goes through pageable memory, only slower.
    /// </summary>
    internal static Tensor NewHostBuffer(long[] shape, ScalarType dtype, bool pinned)
    {
        var buffer = empty(shape, dtype, CPU).DetachFromDisposeScope();
        if (!pinned) return buffer;
        try
        {
            var locked = buffer.pin_memory().DetachFromDisposeScope();
            buffer.Dispose();
            return locked;
        }
        catch (Exception e) when (e is ExternalException or InvalidOperationException)
        {
            return buffer;
        }
    }

    /// <summary>
    /// A blocking save of one rank's slices straight from the live tensors (views, no host copy): the training thread
    /// waits for the file.
    /// </summary>
    public static ManifestFile WriteRank(ICheckpointSink sink, ShardingPlan plan, int rank, long step, IReadOnlyDictionary<string, Tensor> tensors)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var views = plan.WritesOf(rank)
            .Select(s => new KeyValuePair<string, Tensor>(s.Name, RowsOf(plan, Lookup(tensors, s.Name), s)))
            .ToList();
        var written = RankFileWriter.Write(sink.LocalPath(step, rank), views, sink.HashChunkBytes, sink.HashChunkAlgorithm);
        return sink.PublishAsync(step, rank, written).GetAwaiter().GetResult();
    }

    /// <summary>The manifest the coordinator commits once every rank of <paramref name="plan"/> has reported its file.</summary>
    public static CheckpointManifest Manifest(string job, ShardingPlan plan, CheckpointPosition position, IEnumerable<ManifestFile> files,
                                              string? configJson, string? tokenizerSha256)
    {
        var fileList = files.OrderBy(f => f.Name, StringComparer.Ordinal).ToList();
        var expected = Enumerable.Range(0, plan.Layout.WorldSize).Select(ShardingPlan.FileOf).Order(StringComparer.Ordinal);
        if (!fileList.Select(f => f.Name).SequenceEqual(expected))
            throw new ArgumentException($"the manifest needs one file per rank ({plan.Layout.WorldSize}); got {string.Join(", ", fileList.Select(f => f.Name))}");
        return new CheckpointManifest
        {
            Job = job, Step = position.Step, Generation = position.Generation,
            ConsumedSamples = position.ConsumedSamples, OptimizerSteps = position.OptimizerSteps,
            Layout = plan.Layout, Tensors = plan.ManifestTensors(), Files = fileList,
            Config = configJson is null ? null : JsonDocument.Parse(configJson).RootElement.Clone(),
            TokenizerSha256 = tokenizerSha256,
        }.Validated("the new manifest");
    }

    /// <summary>
    /// Saves all ranks of <paramref name="layout"/> from one process (a loop over ranks) and commits: the single-process
    /// trainer, HF import, tests and the benchmark.
    /// </summary>
    public static async Task<CheckpointManifest> SaveAllRanksAsync(ICheckpointSink sink, string job, ParallelLayout layout,
        IReadOnlyList<KeyValuePair<string, Tensor>> tensors, CheckpointPosition position, string? configJson, string? tokenizerSha256,
        CancellationToken ct = default)
    {
        var plan = new ShardingPlan(layout, CheckpointTensors.Catalog(tensors));
        var byName = tensors.ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        var files = new List<ManifestFile>();
        for (int r = 0; r < layout.WorldSize; r++)
        {
            ct.ThrowIfCancellationRequested();
            files.Add(WriteRank(sink, plan, r, position.Step, byName));
        }
        var manifest = Manifest(job, plan, position, files, configJson, tokenizerSha256);
        await sink.CommitAsync(manifest, ct);
        return manifest;
    }

    /// <summary>
    /// The rows <paramref name="slice"/> of a rank's tensor: narrowed from a whole tensor, or the tensor itself when it
    /// holds exactly those rows (a ZeRO shard's optimizer state: replica d updates the very rows it writes).
    /// </summary>
    internal static Tensor RowsOf(ShardingPlan plan, Tensor t, TensorSlice slice)
    {
        if (t.dim() == 0) return t.alias();
        if (t.shape[0] == plan.Entry(slice.Name).Rows) return t.narrow(0, slice.RowStart, slice.RowCount);
        if (t.shape[0] == slice.RowCount) return t.alias();
        throw new ArgumentException($"tensor '{slice.Name}' has {t.shape[0]} rows on this rank: expected all {plan.Entry(slice.Name).Rows} or its shard's {slice.RowCount}");
    }

    internal static Tensor Lookup(IReadOnlyDictionary<string, Tensor> tensors, string name) =>
        tensors.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"the plan assigns tensor '{name}' to this rank, but the rank does not hold it");
}
