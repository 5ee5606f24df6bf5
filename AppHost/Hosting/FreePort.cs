// Loopback ports for child processes and in-process servers, picked where no outgoing connection can take them first.
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.AppHost.Hosting;

/// <summary>
/// A port from the kernel's ephemeral range (what binding port 0 gives) can be handed to any process's outgoing connection
/// between the moment it is picked and the moment the server binds it, which then fails with "address already in use" (a CI
/// run lost a test to that). Ports below that range are only ever taken by a server that names them, so they are handed
/// out from there: each process starts at its own random place in the band, skips what it has handed out already, and
/// checks that a port binds before handing it out.
/// </summary>
public static class FreePort
{
    static readonly (int Low, int High) Band = BelowEphemeral();
    static readonly HashSet<int> Handed = [];
    static int next = Band.Low + Random.Shared.Next(Band.High - Band.Low);

    /// <summary>A loopback port nobody listens on now, that this process has not handed out before.</summary>
    public static int Next()
    {
        lock (Handed)
        {
            for (int tries = Band.High - Band.Low; tries > 0; tries--)
            {
                int port = next;
                next = next + 1 < Band.High ? next + 1 : Band.Low;
                if (!Handed.Contains(port) && Bindable(port))
                {
                    Handed.Add(port);
                    return port;
                }
            }
        }
        throw new InvalidOperationException($"no free loopback port left in {Band.Low}-{Band.High - 1} (below the ephemeral range)");
    }

    static bool Bindable(int port)
    {
        try
        {
            using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            socket.Bind(new IPEndPoint(IPAddress.Loopback, port));
            socket.Listen();
            return true;
        }
        catch (SocketException) { return false; }
    }

    /// <summary>The 16384 ports below the ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range; elsewhere IANA's 49152).</summary>
    static (int, int) BelowEphemeral()
    {
        int low = 49152;
        try
        {
            var range = File.ReadAllText("/proc/sys/net/ipv4/ip_local_port_range").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (range.Length == 2 && int.TryParse(range[0], out int l) && l > 2048) low = l;
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return (Math.Max(1024, low - 16384), low);
    }
}
