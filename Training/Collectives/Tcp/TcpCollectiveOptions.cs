// Settings of the tcp collective, with the reasons for the defaults.
namespace DeepSeekCluster.Training.Collectives.Tcp;

public sealed record TcpCollectiveOptions
{
    /// <summary>
    /// The longest a rank waits for progress (the rendezvous, a chunk from a peer, a peer reading our chunk) before it
    /// gives up and names the peer. 30 s: far above a loopback or LAN chunk, short enough that a dead worker is noticed
    /// before the coordinator's own patience runs out.
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Bytes per frame. 1 MiB: large enough that per-frame costs vanish, small enough to pipeline a 25 MB bucket over 4+ ranks.</summary>
    public int ChunkBytes { get; init; } = 1 << 20;

    public TcpCollectiveOptions Validated()
    {
        if (Timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(Timeout), Timeout, "the collective timeout must be positive");
        if (ChunkBytes < 64 || ChunkBytes > 64 << 20) throw new ArgumentOutOfRangeException(nameof(ChunkBytes), ChunkBytes, "chunk bytes must be between 64 B and 64 MiB");
        return this;
    }
}
