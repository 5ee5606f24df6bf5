// The last lines each child wrote, stdout and stderr kept apart, so a process that dies can be described by what it said
// last: the AppHost prints its children's lines as they come, but a harness that runs the resource model inside a test
// host has no console anyone reads. Apart, because the two pipes are read by separate readers: the order of lines across
// them is not the order they were written, and a burst of stdout would push a dying process's stderr (where .NET writes
// an unhandled exception) out of a shared window. Not a log store: old lines fall off the front.
namespace DeepSeekCluster.AppHost.Hosting;

public sealed class OutputTail(int capacity)
{
    readonly Queue<string> stdout = new(), stderr = new();

    public void Add(string line, bool error)
    {
        var lines = error ? stderr : stdout;
        lock (lines)
        {
            lines.Enqueue(line);
            while (lines.Count > capacity) lines.Dequeue();
        }
    }

    /// <summary>The last <paramref name="n"/> lines of one stream, oldest first.</summary>
    public IReadOnlyList<string> Last(int n, bool error)
    {
        var lines = error ? stderr : stdout;
        lock (lines) return lines.Skip(Math.Max(0, lines.Count - n)).ToList();
    }

    /// <summary>An exit code in words: a process killed by a signal reports 128 + the signal's number.</summary>
    public static string ExitMeaning(int code) => code switch
    {
        134 => "SIGABRT: an unhandled .NET exception (its text is on stderr) or a native abort",
        137 => "SIGKILL",
        139 => "SIGSEGV",
        143 => "SIGTERM",
        > 128 and < 160 => $"signal {code - 128}",
        _ => "",
    };
}
