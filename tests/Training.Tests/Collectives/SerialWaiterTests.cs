// The NCCL backend's waiter, on the CPU: one thread for every wait, in order, failures handed back, and a stuck wait that
// holds the queue but not the caller (the collective's watchdog polls while the device wait blocks).
using DeepSeekCluster.Training.Collectives;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class SerialWaiterTests
{
    [Fact]
    public async Task EveryWaitRunsOnTheSameThreadInTheOrderSubmitted()
    {
        using var waiter = new SerialWaiter("test waiter");
        var seen = new List<(int Order, int Thread)>();
        var tasks = Enumerable.Range(0, 20).Select(i => waiter.Submit(() => { lock (seen) seen.Add((i, Environment.CurrentManagedThreadId)); })).ToList();
        await Task.WhenAll(tasks);
        Assert.Equal(Enumerable.Range(0, 20), seen.Select(s => s.Order));
        Assert.All(seen, s => Assert.Equal(waiter.ThreadId, s.Thread));
        Assert.NotEqual(Environment.CurrentManagedThreadId, waiter.ThreadId);
    }

    [Fact]
    public async Task AWaitThatThrowsFaultsItsTaskAndTheNextWaitStillRuns()
    {
        using var waiter = new SerialWaiter("test waiter");
        var failed = waiter.Submit(() => throw new InvalidOperationException("device lost"));
        var next = waiter.Submit(() => { });
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => failed);
        Assert.Equal("device lost", e.Message);
        await next;
        Assert.True(next.IsCompletedSuccessfully);
    }

    [Fact]
    public async Task AStuckWaitLeavesTheCallerFreeAndHoldsLaterWaitsUntilItReturns()
    {
        using var release = new ManualResetEventSlim();
        using var waiter = new SerialWaiter("test waiter");
        var stuck = waiter.Submit(release.Wait);
        var later = waiter.Submit(() => { });
        // Submit returned while the first wait blocks: the caller is free to poll, as the watchdog does.
        Assert.False(stuck.IsCompleted);
        Assert.False(later.IsCompleted);
        release.Set();
        await later.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(stuck.IsCompletedSuccessfully);
    }

    [Fact]
    public async Task AfterDisposeTheQueuedWaitsFinishTheThreadEndsAndASubmitIsRefused()
    {
        var waiter = new SerialWaiter("test waiter");
        using var release = new ManualResetEventSlim();
        var queued = waiter.Submit(release.Wait);
        waiter.Dispose();
        waiter.Dispose(); // twice is harmless
        var refused = Assert.Throws<ObjectDisposedException>(() => Refuse(waiter));
        Assert.Contains("test waiter", refused.Message);
        release.Set();
        await queued.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(waiter.Join(TimeSpan.FromSeconds(30)), "the waiter's thread did not end after Dispose");
    }

    // Submit throws before it returns a task: the refusal is synchronous, not a faulted task.
    static void Refuse(SerialWaiter waiter) => _ = waiter.Submit(() => { });
}
