// The signals that stop the AppHost the way 'quit' does (services stopped, the job left in the run folder): Ctrl+C
// (SIGINT) and SIGTERM (kill PID, docker stop, systemd); and whether SIGINT can reach it at all. Not the services' own
// shutdown: DistributedApplication stops them when the run returns.
using System.Runtime.InteropServices;

namespace DeepSeekCluster.AppHost;

public sealed class StopSignals : IDisposable
{
    readonly PosixSignalRegistration[] registrations;

    StopSignals(PosixSignalRegistration[] registrations) => this.registrations = registrations;

    /// <summary>
    /// Cancels <paramref name="stop"/> on SIGINT or SIGTERM instead of letting the runtime end the process there: without
    /// SIGTERM here the runtime exits at once and the services the AppHost started are left running.
    /// </summary>
    public static StopSignals CancelOnSignal(CancellationTokenSource stop)
    {
        void Handle(PosixSignalContext context)
        {
            context.Cancel = true;
            stop.Cancel();
        }
        return new StopSignals([PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle), PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle)]);
    }

    /// <summary>
    /// Whether this process ignores SIGINT, read from /proc/self/status (Linux; false elsewhere). A non-interactive shell
    /// starts a background command ('cmd &amp;' in a script) with SIGINT ignored, children inherit that, and .NET
    /// then installs no handler for it (it respects an inherited ignore): Ctrl+C and kill -INT do nothing to such a process.
    /// </summary>
    public static bool SigintIgnored() => File.Exists("/proc/self/status") && SigintIgnored(File.ReadAllText("/proc/self/status"));

    /// <summary>Whether the SigIgn mask of a /proc/PID/status text has SIGINT's bit (signal 2: bit 1).</summary>
    public static bool SigintIgnored(string procStatus)
    {
        var line = procStatus.Split('\n').FirstOrDefault(l => l.StartsWith("SigIgn:", StringComparison.Ordinal))
                   ?? throw new FormatException("a /proc/PID/status text has a 'SigIgn:' line; this one has none");
        var mask = Convert.ToUInt64(line["SigIgn:".Length..].Trim(), 16);
        return (mask & (1UL << 1)) != 0;
    }

    public void Dispose()
    {
        foreach (var r in registrations) r.Dispose();
    }
}
