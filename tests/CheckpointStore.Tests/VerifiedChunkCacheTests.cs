// Overlapping downloads of one chunk read and hash it once: waiters share the load, its failure and its bytes.
using DeepSeekCluster.CheckpointStore.Services;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class VerifiedChunkCacheTests
{
    static readonly TimeSpan Deadline = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task RequestsForAChunkBeingLoadedWaitForThatLoadAndLaterOnesAreServedFromTheCache()
    {
        var cache = new VerifiedChunkCache();
        var release = new TaskCompletionSource<byte[]>(TaskCreationOptions.RunContinuationsAsynchronously);
        int loads = 0;
        Task<byte[]> Load() { Interlocked.Increment(ref loads); return release.Task; }

        // Each call runs to its first wait before returning: the first starts the load, the others find it running.
        var requests = Enumerable.Range(0, 4).Select(_ => cache.GetOrLoadAsync("f#0#h", Load, CancellationToken.None)).ToList();
        Assert.Equal(1, loads);
        Assert.DoesNotContain(requests, r => r.IsCompleted);
        release.SetResult([1, 2, 3]);
        var results = await Task.WhenAll(requests).WaitAsync(Deadline);
        Assert.All(results, r => Assert.Equal(new byte[] { 1, 2, 3 }, r));
        Assert.Equal(1, loads);

        var again = await cache.GetOrLoadAsync("f#0#h", () => throw new InvalidOperationException("a cached chunk is not loaded again"), CancellationToken.None);
        Assert.Equal(new byte[] { 1, 2, 3 }, again);
    }

    [Fact]
    public async Task AFailedLoadFailsItsWaitersAndIsNotCached()
    {
        var cache = new VerifiedChunkCache();
        var release = new TaskCompletionSource<byte[]>(TaskCreationOptions.RunContinuationsAsynchronously);
        var first = cache.GetOrLoadAsync("f#1#h", () => release.Task, CancellationToken.None);
        var second = cache.GetOrLoadAsync("f#1#h", () => throw new InvalidOperationException("the second request must wait for the first load"), CancellationToken.None);
        release.SetException(new InvalidDataException("chunk 1 hashes to x, the manifest says h"));
        Assert.Contains("the manifest says h", (await Assert.ThrowsAsync<InvalidDataException>(() => first)).Message);
        Assert.Contains("the manifest says h", (await Assert.ThrowsAsync<InvalidDataException>(() => second)).Message);

        // Nothing was kept: the next request reads the chunk again.
        var reread = await cache.GetOrLoadAsync("f#1#h", () => Task.FromResult(new byte[] { 7 }), CancellationToken.None);
        Assert.Equal(new byte[] { 7 }, reread);
    }

    [Fact]
    public async Task AWaiterWhoseStarterWasCancelledLoadsTheChunkItself()
    {
        var cache = new VerifiedChunkCache();
        using var starter = new CancellationTokenSource();
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var first = cache.GetOrLoadAsync("f#2#h", async () =>
        {
            started.SetResult();
            await Task.Delay(Timeout.Infinite, starter.Token); // a read that only ends by its request's cancellation
            return [];
        }, starter.Token);
        await started.Task.WaitAsync(Deadline);
        var waiter = cache.GetOrLoadAsync("f#2#h", () => Task.FromResult(new byte[] { 9 }), CancellationToken.None);
        starter.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => first);
        Assert.Equal(new byte[] { 9 }, await waiter.WaitAsync(Deadline));
    }
}
