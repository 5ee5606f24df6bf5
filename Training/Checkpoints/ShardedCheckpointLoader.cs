// Loads the tensors, or row ranges of them, that a rank of any layout needs, from the slices a checkpoint stores.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

public static class ShardedCheckpointLoader
{
    /// <summary>
    /// Reads in flight at once. Each read of a remote source (the gRPC store) is a round trip that the store serves from
    /// a verified-chunk cache, so a sequential load spends most of its time waiting; four overlap the waits without
    /// holding more than four tensors' bytes in flight.
    /// </summary>
    public const int ReadsInFlight = 4;

    /// <summary>
    /// Assembles each requested slice from the stored slices that overlap it, reading only the overlapping rows, up to
    /// <see cref="ReadsInFlight"/> tensors at a time (a source must take concurrent reads). The result maps tensor names
    /// to new CPU tensors of shape [RowCount, ...] (the caller disposes them). Every request is checked against the
    /// manifest before anything is read; the first failed read fails the load and nothing read is kept.
    /// </summary>
    public static async Task<Dictionary<string, Tensor>> LoadAsync(ICheckpointSource source, CheckpointManifest manifest,
        IEnumerable<TensorSlice> needs, CancellationToken ct = default)
    {
        var work = new List<(TensorSlice Need, ManifestTensor Stored)>();
        foreach (var need in needs)
        {
            if (!manifest.Tensors.TryGetValue(need.Name, out var stored))
                throw new InvalidDataException($"step {manifest.Step} of job '{manifest.Job}' has no tensor '{need.Name}'");
            if (need.RowStart < 0 || need.RowCount < 0 || need.RowEnd > stored.Rows)
                throw new ArgumentOutOfRangeException(nameof(needs), $"rows [{need.RowStart}, {need.RowEnd}) are outside tensor '{need.Name}', which has {stored.Rows}");
            work.Add((need, stored));
        }
        var loaded = new Tensor?[work.Count];
        try
        {
            await System.Threading.Tasks.Parallel.ForEachAsync(Enumerable.Range(0, work.Count), new ParallelOptions { MaxDegreeOfParallelism = ReadsInFlight, CancellationToken = ct },
                async (i, token) => loaded[i] = await AssembleAsync(source, manifest.Step, work[i].Need, work[i].Stored, token));
            var result = new Dictionary<string, Tensor>(work.Count, StringComparer.Ordinal);
            for (int i = 0; i < work.Count; i++) result.Add(work[i].Need.Name, loaded[i]!);
            return result;
        }
        catch
        {
            foreach (var t in loaded) t?.Dispose();
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
    /// layout of a single-process or plain data-parallel run, whatever layout the checkpoint was saved from. Before any
    /// tensor is touched the manifest's config.json and tensor catalogue are compared with the model (and optimizer):
    /// a checkpoint of another model is refused with the differing fields named, and the model stays as it was. A
    /// source that can fill live tensors (<see cref="ICheckpointDirectSource"/>, the folder backend) reads the files
    /// straight into the model's and optimizer's CPU memory, hashing as it goes; any other source, or a model on a GPU,
    /// goes through new host tensors and copies.
    /// </summary>
    public static async Task<CheckpointManifest> LoadReplicaAsync(ICheckpointSource source, long step, DeepSeekForCausalLM model, AdamW? optimizer,
        string? tokenizerSha256 = null, CancellationToken ct = default)
    {
        var manifest = await source.ReadManifestAsync(step, ct);
        string label = $"step {step} of job '{manifest.Job}'";
        if (tokenizerSha256 is not null && manifest.TokenizerSha256 is { } saved && saved != tokenizerSha256)
            throw new InvalidDataException($"{label} was saved with tokenizer {saved}, this run's is {tokenizerSha256}");
        CheckpointCompatibility.Check(manifest, model, optimizer, label);

        bool withOptimizer = optimizer is not null && manifest.Tensors.Keys.Any(ShardingPlan.IsOptimizerState);
        var live = CheckpointTensors.Collect(model, withOptimizer ? optimizer : null)
            .Where(kv => manifest.Tensors.ContainsKey(kv.Key))
            .ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        if (source is ICheckpointDirectSource direct && live.All(kv => CanFillDirectly(kv.Value, manifest.Tensors[kv.Key])))
        {
            // Bytes go into the storage directly, never through a tensor op, so autograd has nothing to record (and its
            // thread-local mode would not follow the reader threads anyway).
            await direct.ReadStepIntoAsync(manifest, live, ct);
            if (optimizer is not null) FinishOptimizer(manifest, optimizer, withOptimizer);
            return manifest;
        }

        var plan = ShardingPlan.For(ParallelLayout.Even(1, 1, manifest.Layout.NumLayers), manifest);
        // A ZeRO shard reads only its rows of the optimizer state, whatever layout saved it.
        var shardRows = optimizer?.ShardRows() ?? new Dictionary<string, (long, long)>();
        // An expert-parallel rank reads only the experts it holds (live holds what this model has).
        var wanted = plan.NeedsOf(0, shardOptimizer: false).Where(s => (optimizer is not null || !ShardingPlan.IsOptimizerState(s.Name)) && live.ContainsKey(s.Name))
            .Select(s => shardRows.TryGetValue(s.Name, out var rows) ? new TensorSlice(s.Name, rows.Start, rows.Count) : s);
        var tensors = await LoadAsync(source, manifest, wanted, ct);
        try { CheckpointTensors.Apply(tensors, manifest, model, optimizer, label); }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        return manifest;
    }

    static bool CanFillDirectly(Tensor live, ManifestTensor stored) =>
        live.device_type == DeviceType.CPU && live.is_contiguous() && live.shape.SequenceEqual(stored.Shape)
        && SafeTensorDtype.TryParse(stored.Dtype, out var type, out _) && type == live.dtype;

    /// <summary>What <see cref="CheckpointTensors.Apply"/> does besides copying: master weights the checkpoint lacks, and the step count.</summary>
    static void FinishOptimizer(CheckpointManifest manifest, AdamW optimizer, bool loaded)
    {
        if (!loaded)
        {
            optimizer.StepCount = 0;
            return;
        }
        using (no_grad())
            foreach (var s in optimizer.Slots)
                if (s.Master is not null && !manifest.Tensors.ContainsKey($"optimizer.{s.Name}.master"))
                {
                    using var own = s.Own(s.Param);
                    s.Master.copy_(own.to_type(ScalarType.Float32));
                }
        optimizer.StepCount = manifest.OptimizerSteps;
    }
}
