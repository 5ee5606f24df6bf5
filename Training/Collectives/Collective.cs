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
        if (rendezvous is null) return TcpRendezvous.Connect(group.JobId, group.Generation, group.Rank, endpoints, options);
        if (rendezvous.JobId != group.JobId || rendezvous.Generation != group.Generation || rendezvous.Rank != group.Rank || rendezvous.WorldSize != group.WorldSize)
            throw new ArgumentException($"the rendezvous was opened for job '{rendezvous.JobId}' generation {rendezvous.Generation} rank {rendezvous.Rank}/{rendezvous.WorldSize}, not for {group}");
        return rendezvous.Connect(endpoints, options);
    }

    /// <summary>
    /// The NCCL unique id of <paramref name="ring"/>'s generation, on every rank: rank 0 makes it with
    /// <paramref name="create"/> (NCCL's bootstrap then listens in that process) and broadcasts it over the ring, whose
    /// peers the Coordinator brokered, as torch.distributed shares it through its store. A rank 0 that cannot make one
    /// says so in the same broadcast, so no rank waits for an id that will not come.
    /// </summary>
    public static byte[] ShareUniqueId(ICollective ring, Func<byte[]> create)
    {
        const int n = NcclCollective.UniqueIdBytes;
        byte[]? id = null;
        CollectiveException? failure = null;
        if (ring.Rank == 0)
        {
            try { id = create(); }
            catch (CollectiveException e) { failure = e; }
            if (id is not null && id.Length != n) throw new InvalidOperationException($"an NCCL unique id is {n} bytes; the factory made {id.Length}");
        }
        // Bytes travel as float32, which holds 0..255 exactly; element 0 says whether rank 0 made one.
        var message = new float[1 + n];
        if (id is not null)
        {
            message[0] = 1;
            for (int i = 0; i < n; i++) message[1 + i] = id[i];
        }
        using var wire = tensor(message).to(ring.Device);
        ring.Broadcast(wire, 0);
        var received = wire.cpu().data<float>().ToArray();
        if (failure is not null) throw failure;
        if (received[0] != 1)
            throw new CollectiveException(CollectiveFailure.Unavailable, $"rank 0 of generation {ring.Generation} could not make the NCCL unique id (its log says why)");
        return received.Skip(1).Select(v => (byte)v).ToArray();
    }
}
