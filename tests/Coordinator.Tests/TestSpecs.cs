// Small job specs and polling for the tests.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

static class TestSpecs
{
    public static JobSpec Tiny(int minWorkers = 2, int maxWorkers = 2, int steps = 3) => new()
    {
        ModelPreset = "tiny", Dataset = "kjv", GlobalBatch = 8, MicroBatch = 2, SeqLen = 64, Steps = steps,
        Schedule = new LrSchedule { WarmupSteps = 1 }, CheckpointInterval = 2, MinWorkers = minWorkers, MaxWorkers = maxWorkers,
    };

    public static WorkerCapabilities Worker(string id) => new() { WorkerId = id, Host = "127.0.0.1", CollectiveEndpoint = $"127.0.0.1:{id.Length + 40000}" };

    /// <summary>Polls until the condition holds (one-way calls land a moment later), failing with what was last seen.</summary>
    public static async Task<T> EventuallyAsync<T>(Func<Task<T>> read, Func<T, bool> done, string what, double seconds = 30)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        T last = await read();
        while (!done(last))
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{what} did not happen within {seconds} s; last seen: {last}");
            await Task.Delay(25);
            last = await read();
        }
        return last;
    }

    public static string TempFolder()
    {
        string dir = Path.Combine(Path.GetTempPath(), "coordinator-tests", Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(dir);
        return dir;
    }
}
