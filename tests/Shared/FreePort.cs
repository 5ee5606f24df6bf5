// A free loopback TCP port for a child process or an in-process server, and a wait until something accepts on one.
using System.Net;
using System.Net.Sockets;

namespace DeepSeekCluster.Tests.Shared;

internal static class FreePort
{
    /// <summary>A port below the ephemeral range, as the AppHost hands them out (see AppHost/Hosting/FreePort.cs).</summary>
    public static int Next() => DeepSeekCluster.AppHost.Hosting.FreePort.Next();

    /// <summary>Polls until <paramref name="port"/> accepts a connection, or fails naming what did not start.</summary>
    public static async Task WaitUntilAcceptingAsync(int port, TimeSpan deadline, string what, Func<string>? diagnostics = null)
    {
        var until = DateTime.UtcNow + deadline;
        while (true)
        {
            try
            {
                using var client = new TcpClient();
                await client.ConnectAsync(IPAddress.Loopback, port);
                return;
            }
            catch (SocketException) when (DateTime.UtcNow < until)
            {
                await Task.Delay(50);
            }
            catch (SocketException e)
            {
                throw new TimeoutException($"{what} did not accept connections on port {port} within {deadline.TotalSeconds} s ({e.Message}). {diagnostics?.Invoke()}");
            }
        }
    }
}
