// The managed stacks of a test's child processes, for the message of a test that timed out waiting on them: a hang then
// says where each process stood. Read with dotnet-stack, a local tool of this repository (.config/dotnet-tools.json;
// ./test.sh runs `dotnet tool restore`). Diagnostics only: a process it cannot read is said so in the text, never thrown.
using System.Diagnostics;
using System.Text;

namespace DeepSeekCluster.Tests.Shared;

internal static class ManagedStacks
{
    static readonly TimeSpan PerProcess = TimeSpan.FromSeconds(60);

    /// <summary>
    /// The stacks of every .NET process whose command line or environment mentions <paramref name="marker"/> (a run's own
    /// folder), read side by side; threads parked idle in the thread pool are left out.
    /// </summary>
    public static string OfProcessesMentioning(string marker)
    {
        var reads = new List<(int Pid, string Name, Task<string> Stacks)>();
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid) || pid == Environment.ProcessId) continue;
            string[] cmd, env;
            try
            {
                cmd = File.ReadAllText(Path.Combine(dir, "cmdline")).Split('\0', StringSplitOptions.RemoveEmptyEntries);
                env = File.ReadAllText(Path.Combine(dir, "environ")).Split('\0', StringSplitOptions.RemoveEmptyEntries);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { continue; } // gone, or not ours
            bool dotnet = cmd.Any(a => a.EndsWith(".dll", StringComparison.Ordinal));
            if (!dotnet || !(cmd.Any(a => a.Contains(marker, StringComparison.Ordinal)) || env.Any(v => v.Contains(marker, StringComparison.Ordinal)))) continue;
            string name = env.FirstOrDefault(v => v.StartsWith("DEEPSEEK_INSTANCE=", StringComparison.Ordinal))?["DEEPSEEK_INSTANCE=".Length..]
                          ?? Path.GetFileName(cmd.First(a => a.EndsWith(".dll", StringComparison.Ordinal)));
            reads.Add((pid, name, Task.Run(() => Report(pid))));
        }
        var text = new StringBuilder();
        foreach (var (pid, name, stacks) in reads)
            text.AppendLine($"---- managed stacks of {name} (pid {pid}) ----").AppendLine(stacks.GetAwaiter().GetResult());
        return reads.Count == 0 ? $"(no .NET process mentions {marker})" : text.ToString();
    }

    static string Report(int pid)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = RepositoryRoot(),
        };
        foreach (var a in (string[])["tool", "run", "dotnet-stack", "report", "-p", pid.ToString()]) psi.ArgumentList.Add(a);
        try
        {
            using var p = Process.Start(psi)!;
            var output = p.StandardOutput.ReadToEndAsync();
            var error = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(PerProcess))
            {
                p.Kill(entireProcessTree: true);
                return $"(dotnet-stack did not answer within {PerProcess.TotalSeconds:0} s)";
            }
            return p.ExitCode == 0 ? WithoutIdleThreads(output.Result)
                : $"(dotnet-stack failed with exit code {p.ExitCode}: {error.Result.Trim()} {output.Result.Trim()}; `dotnet tool restore` installs it)";
        }
        catch (System.ComponentModel.Win32Exception e) { return $"(could not start dotnet-stack: {e.Message})"; }
    }

    /// <summary>Drops the blocks of threads waiting for work in the thread pool: every process has a dozen, none says anything.</summary>
    static string WithoutIdleThreads(string report) =>
        string.Join("\n\n", report.Split("\n\n").Where(block => !block.Contains("LowLevelLifoSemaphore.Wait", StringComparison.Ordinal)));

    static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "DeepSeekCluster.sln"))) return dir.FullName;
        return AppContext.BaseDirectory; // `dotnet tool run` then says it finds no manifest, which the text shows
    }
}
