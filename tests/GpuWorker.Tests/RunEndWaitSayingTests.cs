// A Stop (or rescale, or leave) waits for the run's thread to end, and rank 0's end goes on after the job's Stop: while it
// waits, the worker says what the run is doing now, so a run held somewhere is never a silent one.
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests;

public class RunEndWaitSayingTests
{
    readonly List<string> lines = [];

    [Fact]
    public async Task AWaitForARunThatDoesNotEndSaysWhatTheRunIsDoingNowUntilItEnds()
    {
        var run = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        string doing = "loading the whole model from committed step 12";
        var waiting = ClusterWorker.WaitSayingAsync(run.Task, () => $"not ended yet: {Volatile.Read(ref doing)}", TimeSpan.FromMilliseconds(50),
                                                    l => { lock (lines) lines.Add(l); });

        await LineAppears("not ended yet: loading the whole model from committed step 12", waiting);
        Volatile.Write(ref doing, "putting the model of step 12 into the checkpoint store");
        await LineAppears("not ended yet: putting the model of step 12 into the checkpoint store", waiting);
        run.SetResult();
        await waiting.WaitAsync(TimeSpan.FromMinutes(1));
    }

    /// <summary>Polls the log for <paramref name="line"/>; fails if a minute passes or the wait ends first.</summary>
    async Task LineAppears(string line, Task waiting)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(1);
        while (true)
        {
            lock (lines) if (lines.Contains(line)) return;
            Assert.False(waiting.IsCompleted, "the wait ended before the run did");
            Assert.True(DateTime.UtcNow < deadline, $"'{line}' was not logged within a minute while the run did not end");
            await Task.Delay(10);
        }
    }
}
