// The entry point: picks the backend for a device (nccl for CUDA, tcp for CPU) and forms the group.
using DeepSeekCluster.Training.Collectives.Nccl;
using DeepSeekCluster.Training.Collectives.Tcp;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// Not named <c>Collectives</c>: a type with its namespace's name makes <c>Collectives.Create</c> resolve to the
/// namespace in every file under <c>DeepSeekCluster.Training</c>.
/// </summary>
public static class Collective
{
    /// <summary>"nccl" for CUDA devices, "tcp" for everything else.</summary>
    public static string BackendFor(Device device) => device.type == DeviceType.CUDA ? "nccl" : "tcp";

    /// <summary>
    /// Forms <paramref name="group"/> on <paramref name="device"/>. For tcp, pass the <paramref name="rendezvous"/> this rank
    /// already listens on (its endpoint was published to the coordinator); without one, it binds the port of its own
    /// entry in <see cref="CollectiveGroup.Endpoints"/>.
    /// </summary>
    public static ICollective Create(Device device, CollectiveGroup group, TcpRendezvous? rendezvous = null)
    {
        if (BackendFor(device) == "nccl")
        {
            var id = group.NcclUniqueId ?? throw new ArgumentException("the nccl backend needs the group's NcclUniqueId (made by rank 0, brokered by the coordinator)");
            return NcclCollective.Create(id, group.Rank, group.WorldSize, group.Generation, device, group.Timeout);
        }
        var endpoints = group.Endpoints ?? throw new ArgumentException("the tcp backend needs the group's Endpoints (host:port of every rank)");
        var options = new TcpCollectiveOptions { Timeout = group.Timeout };
        if (rendezvous is null)
        {
            var key = group.LinkKey ?? throw new ArgumentException("the tcp backend needs the group's LinkKey (the generation's key from the assignment)");
            return TcpRendezvous.Connect(group.JobId, group.Generation, key, group.Rank, endpoints, options);
        }
        if (rendezvous.JobId != group.JobId || rendezvous.Generation != group.Generation || rendezvous.Rank != group.Rank || rendezvous.WorldSize != group.WorldSize)
            throw new ArgumentException($"the rendezvous was opened for job '{rendezvous.JobId}' generation {rendezvous.Generation} rank {rendezvous.Rank}/{rendezvous.WorldSize}, not for {group}");
        return rendezvous.Connect(endpoints, options);
    }
}
