// The live training state an elastic worker keeps across the generations of one job, and how the ranks of a new
// generation agree where to resume and copy that state from a replica that holds it.
using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>Holds the worker's live state between runs (see <see cref="ReplicaState"/>); runs use it one at a time.</summary>
public sealed class ReplicaHolder : IDisposable
{
    public ReplicaState? State { get; set; }

    public void Drop()
    {
        State?.Dispose();
        State = null;
    }

    public void Dispose() => Drop();
}

/// <summary>
/// The model and AdamW of one job on this worker, reused by the next generation instead of re-initialising. Step is the
/// optimizer step the tensors are consistent at: it moves only after a completed optimizer step, so a step interrupted
/// before its update leaves the previous step's (consistent) state; −1 while the tensors are being built, loaded or
/// updated (from the update to the end of the step's collectives: StepLoop).
/// </summary>
public sealed class ReplicaState : IDisposable
{
    public required string JobId { get; init; }
    /// <summary>The job spec and data the tensors were built for: another fingerprint cannot reuse them.</summary>
    public required string Fingerprint { get; init; }
    public required DeepSeekForCausalLM Model { get; init; }
    public required AdamW Optimizer { get; init; }
    /// <summary>The pipeline stage the state belongs to (pp &gt; 1; null otherwise): its tensors are the stage's own.</summary>
    public PipelineStage? Stage { get; init; }
    public long Step { get; set; } = -1;
    /// <summary>
    /// Names the history of these tensors: drawn when a state starts from the seed or a checkpoint, copied with a
    /// broadcast. Two ranks at the same step hold the same bytes only when they share it (a worker that was cut off
    /// may hold step N of a history the job abandoned).
    /// </summary>
    public long Lineage { get; set; } = NewLineage();
    /// <summary>The step guard's rule after the steps these tensors hold (null: none judged yet); part of the state, broadcast with it.</summary>
    public GuardState? Guard { get; set; }

    /// <summary>
    /// The replica (ZeRO shard, and under ep the expert shard replica mod <see cref="Ep"/>) the state is laid out for, and of
    /// how many (-1 and 0: neither sharded); a reshard reads it (LiveShards).
    /// </summary>
    public int ZeroShard { get; init; } = -1;
    public int ZeroShards { get; init; }
    /// <summary>The job's expert-parallel width: the model holds expert shard ZeroShard mod Ep's routed experts alone.</summary>
    public int Ep { get; init; } = 1;
    /// <summary>
    /// ZeRO-3: the parameters live as this rank's rows alone (ZeroParameters), so its neighbour copy holds the neighbour's
    /// parameter rows too (in bf16 the fp32 master rows are those rows, rounded) and a reshard writes each rank's new rows.
    /// </summary>
    public bool ShardedParameters { get; init; }
    /// <summary>Every optimizer slot's whole parameter shape (a ZeRO-3 parameter is emptied between uses); null: read them off the parameters.</summary>
    public long[][]? Shapes { get; init; }
    /// <summary>parallel.redundancy: this rank's copy of its ring neighbour's pieces no other rank holds (null: none kept; StatePieces).</summary>
    public NeighbourCopy? Neighbour { get; set; }

    public bool Held => Step >= 0;

    public static long NewLineage() => Random.Shared.NextInt64(1, long.MaxValue);

    public static string FingerprintOf(string jobId, string specJson, long vocabSize, string tokenizerHash) =>
        Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes($"{jobId}\n{specJson}\n{vocabSize}\n{tokenizerHash}")));

    /// <summary>Every tensor that makes up the state: model (HF names, buffers included) and optimizer moments; a stage's own only.</summary>
    public List<KeyValuePair<string, Tensor>> Tensors() => Stage is null ? CheckpointTensors.Collect(Model, Optimizer) : [.. Stage.StageTensors(Optimizer)];

    public void Dispose()
    {
        Neighbour?.Dispose();
        Optimizer.Dispose();
        Model.Dispose();
    }
}

/// <summary>
/// Where a generation resumes: Source is "replica" (broadcast from SourceRank), "shards" (the survivors' live ZeRO shards,
/// resharded: parallel.redundancy), "checkpoint" or "start".
/// </summary>
public sealed record ResumePlan(HeldState[] Held, long Step, string Source, int SourceRank)
{
    public const string Replica = "replica", Shards = "shards", Checkpoint = "checkpoint", Start = "start";

    /// <summary>Some rank must receive the source's state: it holds another step, another history, or nothing.</summary>
    public bool AnyRankBehind => SourceRank >= 0 && Held.Any(h => h != Held[SourceRank]);
}

/// <summary>One rank's held step (−1: nothing) and the lineage of its state.</summary>
public readonly record struct HeldState(long Step, long Lineage);

public static class ReplicaSync
{
    /// <summary>
    /// Every rank contributes its held step (−1: none) and learns every rank's: a one-hot sum over the collective, so
    /// all ranks compute the same plan without asking anyone.
    /// </summary>
    public static HeldState[] ExchangeHeldSteps(ICollective collective, HeldState mine)
    {
        using var all = zeros(2 * collective.WorldSize, dtype: ScalarType.Int64);
        // 0 = holds nothing, so the other ranks' zeros add nothing to this rank's pair.
        all[2 * collective.Rank] = mine.Step + 1;
        all[2 * collective.Rank + 1] = mine.Step >= 0 ? mine.Lineage : 0;
        collective.AllReduce(all, ReduceOp.Sum);
        var v = all.data<long>().ToArray();
        return [.. Enumerable.Range(0, collective.WorldSize).Select(r => new HeldState(v[2 * r] - 1, v[2 * r + 1]))];
    }

    /// <summary>
    /// H = the highest held step, source = the lowest rank holding it, C = the newest committed checkpoint. A live state at
    /// least as new as the checkpoint wins (no step is redone); else the checkpoint; else the start.
    /// </summary>
    public static ResumePlan Decide(HeldState[] held, long committedStep)
    {
        long h = held.Max(x => x.Step);
        if (h > 0 && h >= committedStep) return new ResumePlan(held, h, ResumePlan.Replica, Array.FindIndex(held, x => x.Step == h));
        if (committedStep > 0) return new ResumePlan(held, committedStep, ResumePlan.Checkpoint, -1);
        return new ResumePlan(held, 0, ResumePlan.Start, -1);
    }

    /// <summary>
    /// Copies <paramref name="source"/>'s tensors (same names, shapes and order on every rank) and its step counters to
    /// every rank; returns the bytes broadcast. Tensors off the collective's device travel through a host copy.
    /// </summary>
    public static long Broadcast(ICollective collective, int source, IReadOnlyList<KeyValuePair<string, Tensor>> tensors, ref long step, ref long optimizerSteps, ref long lineage)
    {
        using var noGrad = no_grad();
        long bytes = 0;
        // The catalogue first: a rank with another model or optimizer layout must fail here, not scramble its tensors.
        using (var layout = tensor(new[] { (long)tensors.Count, tensors.Sum(kv => kv.Value.numel()), LayoutHash(tensors) }))
        {
            using var mine = layout.clone();
            collective.Broadcast(layout, source);
            if (!layout.eq(mine).all().item<bool>())
                throw new InvalidDataException($"rank {collective.Rank}: the live state of rank {source} has another tensor layout " +
                    $"({string.Join("/", layout.data<long>().ToArray())} vs {string.Join("/", mine.data<long>().ToArray())}); it cannot be copied");
        }
        foreach (var (_, t) in tensors)
        {
            if (t.device_type == collective.Device.type)
                collective.Broadcast(t, source);
            else
            {
                using var host = t.to(collective.Device);
                collective.Broadcast(host, source);
                if (collective.Rank != source) t.copy_(host);
            }
            bytes += t.numel() * t.element_size();
        }
        using var counters = tensor(new[] { step, optimizerSteps, lineage });
        collective.Broadcast(counters, source);
        step = counters[0].item<long>();
        optimizerSteps = counters[1].item<long>();
        lineage = counters[2].item<long>();
        return bytes;
    }

    /// <summary>A hash of names, shapes and dtypes that fits a long (identical on every rank with the same layout).</summary>
    static long LayoutHash(IReadOnlyList<KeyValuePair<string, Tensor>> tensors)
    {
        var text = new StringBuilder();
        foreach (var (name, t) in tensors) text.Append(name).Append(':').Append(string.Join(",", t.shape)).Append(':').Append(t.dtype).Append(';');
        return BitConverter.ToInt64(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString())), 0) & long.MaxValue;
    }

    /// <summary>SHA-256 over every tensor's bytes in order: equal on two ranks iff their states are bitwise identical.</summary>
    public static string Hash(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (name, t) in tensors)
        {
            sha.AppendData(Encoding.UTF8.GetBytes(name));
            using var host = t.detach().cpu().contiguous();
            sha.AppendData(host.bytes);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    internal static double Seconds(long startTimestamp) => Stopwatch.GetElapsedTime(startTimestamp).TotalSeconds;
}
