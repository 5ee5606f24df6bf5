// 'add' / 'remove' / 'quit' typed on the AppHost's console while the cluster runs.
using DeepSeekCluster.AppHost.Hosting;

namespace DeepSeekCluster.AppHost;

public static class ConsoleCommands
{
    /// <summary>Reads commands until the input ends (CI, redirected input) or the AppHost stops.</summary>
    public static Task AcceptAsync(DistributedApplication app, Resource worker, CancellationTokenSource stop) => Task.Run(async () =>
    {
        int next = worker.Replicas;
        while (!stop.IsCancellationRequested)
        {
            var line = await Console.In.ReadLineAsync(stop.Token);
            if (line is null) return;
            switch (line.Trim())
            {
                case "add" or "+":
                    try { app.Start(worker, next++); }
                    catch (InvalidOperationException e) { Log.AppHost($"not added: {e.Message}"); }
                    break;
                case "remove" or "-":
                    var victim = app.Instances(worker).LastOrDefault();
                    if (victim is null) Log.AppHost("no worker to remove");
                    else { Log.AppHost($"asking {victim} to leave"); await app.StopInstanceAsync(victim, TimeSpan.FromSeconds(30)); }
                    break;
                case "quit" or "q":
                    stop.Cancel();
                    break;
                case "":
                    break;
                default:
                    Log.AppHost($"unknown command '{line.Trim()}': add, remove, quit");
                    break;
            }
        }
    });
}
