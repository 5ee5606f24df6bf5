// A collective among some ranks of a group (the holders of one expert shard), built from the group's all-to-all.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// All-reduce, reduce-scatter and all-gather among <see cref="Members"/> (world ranks, ascending) of
/// <paramref name="world"/>, each one all-to-all of the whole group in which the rank sends to and receives from its
/// members only. So the subgroups must partition the world into groups of one size (as the holders of each expert
/// shard do), and every rank makes the same calls in the same order on its own subgroup, at once: together they are one
/// all-to-all of the world. Sums add the members' parts in member order, so they are deterministic (and exact for the
/// int64 gradient words).
/// Expert parallelism × ZeRO uses it for the expert parameters, whose holders are a subgroup; it owns nothing, and the
/// operations a ZeRO step does not need are refused.
/// </summary>
public sealed class SubgroupCollective : ICollective
{
    readonly ICollective world;

    /// <summary>The world ranks of the subgroup, ascending; <see cref="Rank"/> is this rank's index in it.</summary>
    public IReadOnlyList<int> Members { get; }
    public int Rank { get; }
    public int WorldSize => Members.Count;
    public long Generation => world.Generation;
    public Device Device => world.Device;

    public SubgroupCollective(ICollective world, IReadOnlyList<int> members)
    {
        if (members.Count == 0 || members.Distinct().Count() != members.Count || members.Any(m => m < 0 || m >= world.WorldSize) || !members.Order().SequenceEqual(members))
            throw new ArgumentException($"subgroup members [{string.Join(", ", members)}]: expected distinct ranks of [0, {world.WorldSize}) in ascending order", nameof(members));
        Rank = members.ToList().IndexOf(world.Rank);
        if (Rank < 0) throw new ArgumentException($"rank {world.Rank} is not a member of the subgroup [{string.Join(", ", members)}]", nameof(members));
        this.world = world;
        Members = members;
    }

    long[] Rows(long each)
    {
        var rows = new long[world.WorldSize];
        foreach (var m in Members) rows[m] = each;
        return rows;
    }

    /// <summary>Every member's <paramref name="n"/> elements of <paramref name="input"/>'s parts (part i to member i), in member order.</summary>
    Tensor Exchange(Tensor input, long n)
    {
        var output = empty(Members.Count * n, input.dtype, world.Device);
        var rows = Rows(n);
        world.AllToAll(input, rows, output, rows);
        return output;
    }

    static Tensor Reduce(Tensor parts, int count, long n, ReduceOp op)
    {
        var total = parts.narrow(0, 0, n).clone();
        for (int i = 1; i < count; i++)
        {
            using var part = parts.narrow(0, i * n, n);
            if (op == ReduceOp.Max) total.copy_(total.maximum(part));
            else total.add_(part);
        }
        if (op == ReduceOp.Avg) total.div_(count);
        return total;
    }

    public void AllReduce(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        if (Members.Count == 1) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long n = tensor.numel();
        var input = tensor.reshape(-1).to(world.Device).unsqueeze(0).expand(Members.Count, n).reshape(-1).contiguous();
        tensor.copy_(Reduce(Exchange(input, n), Members.Count, n, op).view(tensor.shape));
    }

    public void ReduceScatter(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum)
    {
        long n = output.numel();
        if (input.numel() != Members.Count * n)
            throw new ArgumentException($"reduce-scatter over {Members.Count} members: input has {input.numel()} elements, expected {Members.Count} x {n}");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var parts = Exchange(input.reshape(-1).to(world.Device).contiguous(), n);
        output.copy_(Reduce(parts, Members.Count, n, op).view(output.shape));
    }

    public void AllGather(Tensor input, Tensor output)
    {
        long n = input.numel();
        if (output.numel() != Members.Count * n)
            throw new ArgumentException($"all-gather over {Members.Count} members: output has {output.numel()} elements, expected {Members.Count} x {n}");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var copies = input.reshape(-1).to(world.Device).unsqueeze(0).expand(Members.Count, n).reshape(-1).contiguous();
        output.copy_(Exchange(copies, n).view(output.shape));
    }

    public void AllToAll(Tensor input, long[] sendRows, Tensor output, long[] receiveRows) =>
        throw new NotSupportedException("a subgroup's all-to-all: use the whole group's");
    public void Broadcast(Tensor tensor, int root) => throw new NotSupportedException("a subgroup does not broadcast");
    public void Send(Tensor tensor, int peer) => throw new NotSupportedException("a subgroup does not send point to point");
    public void Recv(Tensor tensor, int peer) => throw new NotSupportedException("a subgroup does not receive point to point");
    public void Barrier()
    {
        using var token = zeros(1, dtype: ScalarType.Int64, device: world.Device);
        AllReduce(token);
    }

    /// <summary>Nothing: the world collective belongs to its creator.</summary>
    public void Dispose() { }
}
