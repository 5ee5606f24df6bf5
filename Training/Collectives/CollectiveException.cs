// The one exception a collective throws: what went wrong, and which peer (rank and address) it was.
namespace DeepSeekCluster.Training.Collectives;

public enum CollectiveFailure
{
    /// <summary>The peer closed its connection or its process died.</summary>
    PeerLost,
    /// <summary>The peer sent (or accepted) nothing within the timeout.</summary>
    PeerStalled,
    /// <summary>The peer refused us, or we refused it (another job, another generation, a wrong rank): fencing.</summary>
    Refused,
    /// <summary>The peer sent something this protocol does not expect (mismatched calls or sizes).</summary>
    Protocol,
    /// <summary>The backend is not usable here (no CUDA, no libnccl) or the instance was disposed or faulted.</summary>
    Unavailable,
}

public sealed class CollectiveException : Exception
{
    public CollectiveFailure Failure { get; }
    /// <summary>The rank whose failure this is, when known.</summary>
    public int? PeerRank { get; }
    /// <summary>That rank's address (host:port), when known.</summary>
    public string? PeerAddress { get; }

    public CollectiveException(CollectiveFailure failure, string message, int? peerRank = null, string? peerAddress = null, Exception? inner = null)
        : base(message, inner)
    {
        Failure = failure;
        PeerRank = peerRank;
        PeerAddress = peerAddress;
    }

    internal static string Peer(int rank, string address) => $"rank {rank} ({address})";
}
