// What soak and recovery share: a run folder, and the children's chatter kept in a log file so the
// results on stdout stay readable.
using System.Globalization;

namespace DeepSeekCluster.Bench;

static class ClusterBenchSupport
{
    /// <summary>Sends everything written to Console.Out (the children's lines) to a file; returns the real stdout.</summary>
    public static TextWriter DivertChildOutput(string runDir)
    {
        var stdout = Console.Out;
        var file = new StreamWriter(Path.Combine(runDir, "cluster.log")) { AutoFlush = true };
        Console.SetOut(TextWriter.Synchronized(file));
        Console.SetError(TextWriter.Synchronized(file));
        return stdout;
    }

    public static string NewRunDir(string verb) =>
        Directory.CreateDirectory(Path.Combine(Path.GetTempPath(), $"bench-{verb}-{DateTime.UtcNow:yyyyMMdd-HHmmss}")).FullName;

    public static string F(double? v, string format = "F2") => v is { } x ? x.ToString(format, CultureInfo.InvariantCulture) : "–";
}
