// The collective operations of one data-parallel group (one instance per generation); backends: Tcp/ (CPU) and Nccl/ (CUDA).
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

public enum ReduceOp { Sum, Avg, Max }

/// <summary>
/// Collective communication among <see cref="WorldSize"/> ranks of one generation. Every rank calls the same operations
/// in the same order with tensors of the same shape and dtype. Every operation has a timeout: a peer that dies or stalls
/// makes it throw <see cref="CollectiveException"/> naming that peer, never hang. After a failure the instance is
/// faulted (every later call throws); the next generation creates a new one. Not thread-safe: one operation at a time.
/// </summary>
public interface ICollective : IDisposable
{
    int Rank { get; }
    int WorldSize { get; }
    /// <summary>The job generation this group was formed for; peers of another generation are refused.</summary>
    long Generation { get; }
    /// <summary>Where this backend's tensors live (CPU for tcp, cuda:N for nccl).</summary>
    Device Device { get; }

    /// <summary>Reduces <paramref name="tensor"/> over all ranks, in place; every rank ends with the same bytes.</summary>
    void AllReduce(Tensor tensor, ReduceOp op = ReduceOp.Sum);
    /// <summary>Reduces <paramref name="input"/> (WorldSize·n elements) over ranks; rank r receives part r (n elements) in <paramref name="output"/>.</summary>
    void ReduceScatter(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum);
    /// <summary>Concatenates every rank's <paramref name="input"/> (n elements) in rank order into <paramref name="output"/> (WorldSize·n).</summary>
    void AllGather(Tensor input, Tensor output);
    /// <summary>
    /// Every rank sends rows (dim 0) of <paramref name="input"/> to every rank: the first <paramref name="sendRows"/>[0]
    /// rows to rank 0, the next sendRows[1] to rank 1, and so on; <paramref name="output"/> receives, in rank order,
    /// <paramref name="receiveRows"/>[j] rows from rank j. Counts may be uneven or zero, but must agree: what rank i
    /// receives from j is what j sends to i. Both tensors have the same dtype and row size (expert parallelism's token
    /// dispatch and combine).
    /// </summary>
    void AllToAll(Tensor input, long[] sendRows, Tensor output, long[] receiveRows);
    /// <summary>Copies <paramref name="root"/>'s tensor into <paramref name="tensor"/> on every rank.</summary>
    void Broadcast(Tensor tensor, int root);
    void Send(Tensor tensor, int peer);
    void Recv(Tensor tensor, int peer);
    void Barrier();
}
