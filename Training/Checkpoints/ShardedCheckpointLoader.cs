// Loads the tensors, or row ranges of them, that a rank of any layout needs, from the slices a checkpoint stores.
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

public static class ShardedCheckpointLoader
{
    /// <summary>
    /// Assembles each requested slice from the stored slices that overlap it, reading only the overlapping rows. The
    /// result maps tensor names to new CPU tensors of shape [RowCount, ...] (the caller disposes them).
    /// </summary>
    public static async Task<Dictionary<string, Tensor>> LoadAsync(ICheckpointSource source, CheckpointManifest manifest,
        IEnumerable<TensorSlice> needs, CancellationToken ct = default)
    {
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var need in needs)
            {
                if (!manifest.Tensors.TryGetValue(need.Name, out var stored))
                    throw new InvalidDataException($"step {manifest.Step} of job '{manifest.Job}' has no tensor '{need.Name}'");
                if (need.RowStart < 0 || need.RowCount < 0 || need.RowEnd > stored.Rows)
                    throw new ArgumentOutOfRangeException(nameof(needs), $"rows [{need.RowStart}, {need.RowEnd}) are outside tensor '{need.Name}', which has {stored.Rows}");
                result.Add(need.Name, await AssembleAsync(source, manifest.Step, need, stored, ct));
            }
            return result;
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
    }

    static async Task<Tensor> AssembleAsync(ICheckpointSource source, long step, TensorSlice need, ManifestTensor stored, CancellationToken ct)
    {
        var pieces = stored.Slices.Where(s => s.RowStart < need.RowEnd && s.RowStart + s.RowCount > need.RowStart).ToList();
        if (stored.Shape.Length == 0) return await source.ReadAsync(step, pieces[0].File, need.Name, null, ct);
        if (pieces.Count == 1 && pieces[0].RowStart == need.RowStart && pieces[0].RowCount == need.RowCount)
            return await source.ReadAsync(step, pieces[0].File, need.Name, null, ct); // stored exactly as needed

        var result = empty([need.RowCount, .. stored.Shape.AsSpan(1)], SafeTensorDtype.ToScalarType(stored.Dtype));
        try
        {
            long covered = 0;
            foreach (var p in pieces)
            {
                long from = Math.Max(p.RowStart, need.RowStart), to = Math.Min(p.RowStart + p.RowCount, need.RowEnd);
                using var part = await source.ReadAsync(step, p.File, need.Name, (from - p.RowStart, to - from), ct);
                using var target = result.narrow(0, from - need.RowStart, to - from);
                target.copy_(part);
                covered += to - from;
            }
            if (covered != need.RowCount)
                throw new InvalidDataException($"the stored slices of '{need.Name}' cover {covered} of rows [{need.RowStart}, {need.RowEnd})");
            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Loads a whole replica (every tensor whole) into <paramref name="model"/> and <paramref name="optimizer"/>: the
    /// layout of a single-process or plain data-parallel run, whatever layout the checkpoint was saved from.
    /// </summary>
    public static async Task<CheckpointManifest> LoadReplicaAsync(ICheckpointSource source, long step, DeepSeekForCausalLM model, AdamW? optimizer,
        string? tokenizerSha256 = null, CancellationToken ct = default)
    {
        var manifest = await source.ReadManifestAsync(step, ct);
        if (tokenizerSha256 is not null && manifest.TokenizerSha256 is { } saved && saved != tokenizerSha256)
            throw new InvalidDataException($"step {step} of job '{manifest.Job}' was saved with tokenizer {saved}, this run's is {tokenizerSha256}");
        var plan = ShardingPlan.For(ParallelLayout.Even(1, 1, manifest.Layout.NumLayers), manifest);
        var wanted = plan.NeedsOf(0, shardOptimizer: false).Where(s => optimizer is not null || !ShardingPlan.IsOptimizerState(s.Name));
        var tensors = await LoadAsync(source, manifest, wanted, ct);
        try { CheckpointTensors.Apply(tensors, manifest, model, optimizer, $"step {step} of job '{manifest.Job}'"); }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        return manifest;
    }
}
