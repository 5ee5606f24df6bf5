// The real DataShardService executable's `prepare` verb as a child process: run to the end, or SIGKILLed at a chosen line.
using System.Diagnostics;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed record PrepareRun(int ExitCode, bool Killed, string Output, long PeakRssBytes)
{
    public IEnumerable<string> Lines => Output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r'));
}

public static class PrepareProcess
{
    private static readonly TimeSpan Deadline = TimeSpan.FromMinutes(5);

    /// <summary>
    /// Runs `prepare args` with <paramref name="settings"/> as environment variables, the way the service reads them
    /// ("DataShards:WorkDir" → DataShards__WorkDir). When <paramref name="killAt"/> matches a stdout line the process
    /// gets SIGKILL at once (Process.Kill on Linux), so it stops wherever it is, with no cleanup of its own.
    /// PeakRssBytes is the largest VmHWM read from /proc while it ran (a lower bound of its peak resident memory).
    /// </summary>
    public static async Task<PrepareRun> RunAsync(IReadOnlyDictionary<string, string?> settings, IEnumerable<string> args,
        Func<string, bool>? killAt = null)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "DeepSeekCluster.DataShardService.dll");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.ArgumentList.Add(dll);
        start.ArgumentList.Add("prepare");
        foreach (string a in args) start.ArgumentList.Add(a);
        foreach (var (key, value) in settings) start.Environment[key.Replace(":", "__", StringComparison.Ordinal)] = value;

        using var process = Process.Start(start)!;
        var output = new System.Text.StringBuilder();
        bool killed = false;
        long peak = 0;
        using var deadline = new CancellationTokenSource(Deadline);
        var stderr = process.StandardError.ReadToEndAsync(deadline.Token);
        var watch = Task.Run(async () =>
        {
            // VmHWM only grows, so the last read before the exit is the closest; read often.
            using var timer = new PeriodicTimer(TimeSpan.FromMilliseconds(20));
            while (!process.HasExited && await timer.WaitForNextTickAsync(deadline.Token))
                peak = Math.Max(peak, ReadHighWaterMark(process.Id));
        });
        // Lines are read on a thread of their own, not the thread pool: with many tests running, a pool continuation
        // can wait long enough for the process to run past the point the kill was meant for.
        await Task.Factory.StartNew(() =>
        {
            while (process.StandardOutput.ReadLine() is { } line)
            {
                lock (output) output.AppendLine(line);
                if (!killed && killAt is not null && killAt(line))
                {
                    killed = true;
                    try
                    {
                        process.Kill();
                    }
                    catch (InvalidOperationException)
                    {
                        // it had already exited: the exit code says so below
                    }
                }
            }
        }, deadline.Token, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        await process.WaitForExitAsync(deadline.Token);
        await watch;
        output.Append(await stderr);
        // A kill that came after the process had finished on its own did not interrupt anything.
        return new PrepareRun(process.ExitCode, killed && process.ExitCode != 0, output.ToString(), peak);
    }

    private static long ReadHighWaterMark(int pid)
    {
        try
        {
            foreach (string line in File.ReadLines($"/proc/{pid}/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        }
        catch (IOException)
        {
            // the process ended between the check and the read
        }
        return 0;
    }
}
