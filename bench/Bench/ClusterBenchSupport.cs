// What soak and recovery share: arguments, a run folder, and the children's chatter kept in a log file so the
// results on stdout stay readable.
using System.Globalization;

namespace DeepSeekCluster.Bench;

static class ClusterBenchSupport
{
    public static string Arg(string[] args, string name, string fallback)
    {
        int i = Array.IndexOf(args, name);
        if (i < 0) return fallback;
        if (i + 1 >= args.Length) throw new ArgumentException($"option {name} needs a value");
        return args[i + 1];
    }

    public static int Int(string[] args, string name, int fallback, int min = 0)
    {
        var v = Arg(args, name, fallback.ToString(CultureInfo.InvariantCulture));
        return int.TryParse(v, out var n) && n >= min ? n : throw new ArgumentException($"option {name}: '{v}' is not an integer >= {min}");
    }

    public static double Double(string[] args, string name, double fallback)
    {
        var v = Arg(args, name, fallback.ToString(CultureInfo.InvariantCulture));
        return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d > 0 ? d : throw new ArgumentException($"option {name}: '{v}' is not a positive number");
    }

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
