// Finds processes by what they carry in their command line or environment, by reading /proc (Linux).
namespace DeepSeekCluster.Chaos;

public static class ProcessScan
{
    /// <summary>Processes (other than this one) whose command line or environment contains <paramref name="text"/>.</summary>
    public static List<int> Mentioning(string text)
    {
        var found = new List<int>();
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid) || pid == Environment.ProcessId) continue;
            try
            {
                if (IsZombieOfOurs(dir)) continue;
                var cmd = File.ReadAllText(Path.Combine(dir, "cmdline")).Replace('\0', ' ');
                var env = "\n" + File.ReadAllText(Path.Combine(dir, "environ")).Replace('\0', '\n');
                if (cmd.Contains(text) || env.Contains(text)) found.Add(pid);
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
        return found;
    }

    /// <summary>
    /// Processes started as <paramref name="instance"/> (the hosting sets DEEPSEEK_INSTANCE for each) for the run in
    /// <paramref name="runDir"/>: instance names repeat across clusters (another test run's gpu-worker-3 is not ours).
    /// </summary>
    public static List<int> OfInstance(string instance, string runDir)
    {
        var ours = Mentioning(runDir).ToHashSet();
        return Mentioning($"\nDEEPSEEK_INSTANCE={instance}\n").Where(ours.Contains).ToList();
    }

    // A child that exited but is not reaped yet has an empty environ; it holds no resources and .NET reaps it shortly.
    static bool IsZombieOfOurs(string dir)
    {
        var stat = File.ReadAllText(Path.Combine(dir, "stat"));
        int close = stat.LastIndexOf(')');
        return close > 0 && close + 2 < stat.Length && stat[close + 2] == 'Z';
    }

    /// <summary>Polls until no process mentions <paramref name="text"/>; returns those still alive at the deadline.</summary>
    public static async Task<List<int>> WaitUntilNoneAsync(Func<List<int>> scan, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var left = scan();
            if (left.Count == 0 || DateTime.UtcNow > deadline) return left;
            await Task.Delay(200);
        }
    }

    public static string Describe(IEnumerable<int> pids) => string.Join("; ", pids.Select(pid =>
    {
        try { return $"{pid}: {File.ReadAllText($"/proc/{pid}/cmdline").Replace('\0', ' ').Trim()}"; }
        catch (IOException) { return $"{pid}: (gone)"; }
    }));
}
