// A child process of the AppHost: started with its environment, output prefixed with its resource name, killed with its tree.
using System.Diagnostics;

namespace DeepSeekCluster.AppHost;

public sealed class ChildProcess : IDisposable
{
    readonly Process process;
    public string Name { get; }

    public ChildProcess(string name, string fileName, IEnumerable<string> args, IDictionary<string, string> env, string workingDirectory)
    {
        Name = name;
        var psi = new ProcessStartInfo(fileName)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
            WorkingDirectory = workingDirectory,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env) psi.Environment[k] = v;
        process = new Process { StartInfo = psi, EnableRaisingEvents = true };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) Console.WriteLine($"[{name}] {e.Data}"); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) Console.Error.WriteLine($"[{name}] {e.Data}"); };
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
    }

    public int Id => process.Id;

    public Task<int> WaitAsync(CancellationToken ct) => process.WaitForExitAsync(ct).ContinueWith(_ => process.ExitCode, TaskContinuationOptions.OnlyOnRanToCompletion);

    public void Stop()
    {
        try { if (!process.HasExited) process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
        process.WaitForExit(10_000);
    }

    public void Dispose()
    {
        Stop();
        process.Dispose();
    }
}
