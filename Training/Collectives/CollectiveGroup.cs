// Who forms a collective: job, generation, rank and world, plus what each backend's rendezvous needs.
namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// The membership of one generation's collective, as the coordinator assigns it. The tcp backend needs
/// <see cref="Endpoints"/> (every rank's "host:port", by rank); the nccl backend needs <see cref="NcclUniqueId"/>
/// (128 bytes made by rank 0 with <c>NcclCollective.CreateUniqueId()</c> and brokered to every rank).
/// </summary>
public sealed record CollectiveGroup(string JobId, long Generation, int Rank, int WorldSize)
{
    public IReadOnlyList<string>? Endpoints { get; init; }
    public byte[]? NcclUniqueId { get; init; }
    /// <summary>The generation's link key (tcp): a rendezvous admits only peers that prove they hold it.</summary>
    public byte[]? LinkKey { get; init; }
    /// <summary>Bounds the rendezvous and every operation; see <c>TcpCollectiveOptions.Timeout</c> for the default's reason.</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);
}
