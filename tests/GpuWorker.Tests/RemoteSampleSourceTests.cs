// RemoteSampleSource against the real DataShards service over gRPC: the prefetch of the next step's window changes which
// calls are made and when, never which samples a fetch returns; an error or a cancel of the prefetch reaches the caller.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Parallel;
using Grpc.Core;
using Grpc.Core.Interceptors;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class DataShardsHostFixture : IAsyncLifetime
{
    public DataShardsHost Host { get; private set; } = null!;
    public async Task InitializeAsync() => Host = await DataShardsHost.StartAsync();
    public async Task DisposeAsync() => await Host.DisposeAsync();
}

public class RemoteSampleSourceTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    const int Micro = 2;
    static readonly TimeSpan Deadline = TimeSpan.FromSeconds(60);
    DataShardsHost Host => fixture.Host;

    /// <summary>
    /// A source as TrainingRun opens it: the rank's share of a step per call, and the next step's share prefetched when
    /// asked. Each test has its own permutation seed, by which its calls are told apart at the service.
    /// </summary>
    Task<RemoteSampleSource> OpenAsync(ulong seed, int globalBatch, int dp, long steps, bool prefetch, CancellationToken ct = default, string split = "train") =>
        RemoteSampleSource.OpenAsync(Host.Client, Host.DatasetId, seed, DataShardsHost.SeqLen, steps * globalBatch, ct, split,
                                     readAhead: globalBatch / dp, stride: prefetch ? globalBatch : 0);

    /// <summary>The trainer's fetches (Trainer.TrainStep): rank r of dp reads its share of each step in micro-batches.</summary>
    static IEnumerable<(long Start, int Count)> RunPattern(int globalBatch, int dp, int rank, long steps)
    {
        int perReplica = globalBatch / dp;
        for (long step = 0; step < steps; step++)
            for (int a = 0; a < perReplica / Micro; a++)
                yield return (step * globalBatch + (long)rank * perReplica + a * Micro, Micro);
    }

    static long[] Values(Tensor t) => t.data<long>().ToArray();

    internal static async Task Until(Func<bool> condition, string what)
    {
        var deadline = DateTime.UtcNow + Deadline;
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, $"timed out waiting for {what}");
            await Task.Delay(10);
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public async Task PrefetchOnAndOffServeTheSameSamplesOverARunsAccessPattern(int dp)
    {
        const int globalBatch = 8;
        ulong seed = 100 + (ulong)dp;
        long trainSamples = Host.Manifest.Splits["train"].Samples;
        // Past one epoch, so windows cross an epoch boundary; ends exactly on the job's last sample.
        long steps = trainSamples * 3 / 2 / globalBatch + 1;
        long total = steps * globalBatch;
        for (int rank = 0; rank < dp; rank++)
        {
            int before = Host.Calls.Of(seed).Count;
            var without = new List<long[]>();
            using (var source = await OpenAsync(seed, globalBatch, dp, steps, prefetch: false))
                foreach (var (start, count) in RunPattern(globalBatch, dp, rank, steps))
                    using (var t = source.Fetch(start, count)) without.Add(Values(t));
            var callsWithout = Host.Calls.Of(seed).Skip(before).ToList();

            before = Host.Calls.Of(seed).Count;
            var with = new List<long[]>();
            using (var source = await OpenAsync(seed, globalBatch, dp, steps, prefetch: true))
                foreach (var (start, count) in RunPattern(globalBatch, dp, rank, steps))
                    using (var t = source.Fetch(start, count)) with.Add(Values(t));
            var callsWith = Host.Calls.Of(seed).Skip(before).ToList();

            var pattern = RunPattern(globalBatch, dp, rank, steps).ToList();
            Assert.Equal(pattern.Count, with.Count);
            for (int i = 0; i < pattern.Count; i++)
            {
                Assert.Equal(without[i], with[i]);
                Assert.Equal(Host.ReadDirectly("train", seed, pattern[i].Start, pattern[i].Count), with[i]);
            }
            // One call per step either way: each window is asked for once, by the prefetch from the second step on, and
            // nothing at or past the job's last sample (the last window starts no prefetch).
            var windows = Enumerable.Range(0, (int)steps).Select(s => (long)s * globalBatch + (long)rank * (globalBatch / dp)).ToList();
            Assert.Equal(windows, callsWithout.Select(c => c.Start));
            Assert.Equal(windows, callsWith.Select(c => c.Start));
            Assert.All(callsWith, c => Assert.Equal(globalBatch / dp, c.Count));
            Assert.All(callsWith, c => Assert.True(c.End <= total, $"a call asked for [{c.Start}, {c.End}), past the job's {total} samples"));
        }
    }

    [Fact]
    public async Task TheServedIndicesAreThoseTheServicesRepliesCarriedNotThoseAsked()
    {
        const int globalBatch = 4;
        const ulong seed = 900;
        // A faulty service answers the call for step 1's window [4, 8) with samples [5, 9).
        Host.Calls.Rewrite = r => r.Seed == seed && r.Start == globalBatch ? new GetBatchRequest(r) { Start = globalBatch + 1 } : null;
        using var source = await OpenAsync(seed, globalBatch, 1, steps: 3, prefetch: false);
        for (int a = 0; a < globalBatch / Micro; a++) using (source.Fetch(a * Micro, Micro)) { }
        Assert.Equal(new SampleRange[] { new(0, globalBatch) }, source.TakeServed());
        Assert.Empty(source.TakeServed()); // taken once

        for (int a = 0; a < globalBatch / Micro; a++)
            using (var t = source.Fetch(globalBatch + a * Micro, Micro))
                Assert.Equal(Host.ReadDirectly("train", seed, globalBatch + 1 + a * Micro, Micro), Values(t));
        Assert.Equal(new SampleRange[] { new(globalBatch + 1, globalBatch) }, source.TakeServed());
    }

    [Fact]
    public async Task APrefetchedWindowIsServedWithoutANewGetBatchCall()
    {
        const int globalBatch = 8, steps = 3;
        const ulong seed = 200;
        using var source = await OpenAsync(seed, globalBatch, 1, steps, prefetch: true);
        using (source.Fetch(0, Micro)) { }
        // The first fetch made one call (window 0) and started the prefetch of window 1.
        await Until(() => Host.Calls.Of(seed).Count == 2, "the prefetch of step 1's window");
        Assert.Equal([0L, globalBatch], Host.Calls.Of(seed).Select(c => c.Start));

        for (int a = 1; a < globalBatch / Micro; a++) using (source.Fetch(a * Micro, Micro)) { }
        Assert.Equal(2, Host.Calls.Of(seed).Count); // the rest of step 0 came from its window

        // Step 1 is the prefetched window: taking it starts the prefetch of step 2 (the last) and makes no call of its own.
        for (int a = 0; a < globalBatch / Micro; a++) using (source.Fetch(globalBatch + a * Micro, Micro)) { }
        await Until(() => Host.Calls.Of(seed).Count == 3, "the prefetch of step 2's window");
        for (int a = 0; a < globalBatch / Micro; a++)
            using (var t = source.Fetch(2 * globalBatch + a * Micro, Micro))
                Assert.Equal(Host.ReadDirectly("train", seed, 2 * globalBatch + a * Micro, Micro), Values(t));
        Assert.Equal([0L, globalBatch, 2 * globalBatch], Host.Calls.Of(seed).Select(c => c.Start));
    }

    [Fact]
    public async Task RandomAccessAndTheValidationSplitGetTheSameSamplesWithThePrefetch()
    {
        const int globalBatch = 8, steps = 10;
        const ulong seed = 300;
        var rng = new Random(5);
        var reads = Enumerable.Range(0, 40).Select(_ => ((long)rng.Next(0, steps * globalBatch - Micro), Micro)).ToList();
        // Forward, backward, inside the prefetched window but not at its start, and across its end.
        reads.AddRange([(0, Micro), (globalBatch + 2, Micro), (2 * globalBatch + 6, 4), (globalBatch, Micro), (5 * globalBatch, globalBatch)]);
        using var source = await OpenAsync(seed, globalBatch, 1, steps, prefetch: true);
        foreach (var (start, count) in reads)
            using (var t = source.Fetch(start, count))
                Assert.Equal(Host.ReadDirectly("train", seed, start, count), Values(t));

        long validation = Host.Manifest.Splits["validation"].Samples;
        using var eval = await OpenAsync(seed, Micro, 1, validation / Micro, prefetch: true, split: "validation");
        for (long b = 0; b + Micro <= validation; b += Micro)
            using (var t = eval.Fetch(b, Micro))
                Assert.Equal(Host.ReadDirectly("validation", seed, b, Micro), Values(t));
    }

    [Fact]
    public async Task AFetchTheServiceNeverAnswersEndsAfterTheSilenceTimeoutNamingTheDatasetAndTheSamples()
    {
        const ulong seed = 450;
        Host.Calls.Hold = r => r.Seed == seed; // the service takes the call and sends nothing, as a stalled one does
        try
        {
            // As rank 0's validation at the end of a job opens it: no cancellation reaches it, the silence bound does.
            var manifest = await Host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = Host.DatasetId });
            using var source = RemoteSampleSource.For(manifest, Host.Client, Host.DatasetId, seed, DataShardsHost.SeqLen, 4 * Micro, CancellationToken.None,
                                                      "validation", silenceTimeout: TimeSpan.FromSeconds(2));

            var e = await Assert.ThrowsAsync<IOException>(() => Task.Run(() => source.Fetch(0, Micro)).WaitAsync(Deadline));

            Assert.Equal($"dataset {Host.DatasetId}: fetching validation samples [0, {Micro}) failed: the data service sent nothing for 2 s", e.Message);
            Assert.True(Host.Calls.Of(seed)[0].Held, "the call was never held at the service");
        }
        finally { Host.Calls.ReleaseAll(); }
    }

    [Fact]
    public async Task AFetchTheServiceHoldsEndsWhenTheRunIsAbortedAndTheServiceSeesItCancelled()
    {
        const ulong seed = 460;
        Host.Calls.Hold = r => r.Seed == seed; // a data service that stopped answering in the middle of a step
        using var abort = new CancellationTokenSource();
        try
        {
            var manifest = await Host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = Host.DatasetId });
            using var source = RemoteSampleSource.For(manifest, Host.Client, Host.DatasetId, seed, DataShardsHost.SeqLen, 4 * Micro, CancellationToken.None,
                                                      readAhead: Micro, abort: abort.Token);
            var fetching = Task.Run(() => source.Fetch(0, Micro));
            await Until(() => Host.Calls.Of(seed) is [{ Held: true }], "the fetch to reach the service");

            abort.Cancel(); // as RunCancellation does a grace after a Stop or a re-formation

            var e = await Assert.ThrowsAnyAsync<Exception>(() => fetching.WaitAsync(Deadline));
            Assert.True(e is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled }, $"not a cancellation: {e}");
            await Until(() => Host.Calls.Of(seed)[0].CancelledWhileHeld, "the service to see the held fetch cancelled");
        }
        finally { Host.Calls.ReleaseAll(); }
    }

    [Fact]
    public async Task DisposingTheSourceCancelsAnOutstandingPrefetch()
    {
        const int globalBatch = 8;
        const ulong seed = 400;
        Host.Calls.Hold = r => r.Seed == seed && r.Start == globalBatch;
        try
        {
            var source = await OpenAsync(seed, globalBatch, 1, 4, prefetch: true);
            using (source.Fetch(0, Micro)) { }
            await Until(() => Host.Calls.Of(seed) is [_, { Held: true }], "the prefetch to reach the service");

            source.Dispose();
            await Until(() => Host.Calls.Of(seed)[1].CancelledWhileHeld, "the service to see the held prefetch cancelled");
            Assert.Throws<ObjectDisposedException>(() => source.Fetch(globalBatch, Micro));
            Assert.Equal(2, Host.Calls.Of(seed).Count);
        }
        finally { Host.Calls.ReleaseAll(); }
    }

    [Fact]
    public async Task CancellingTheRunCancelsTheHeldPrefetchAndTheNextFetchStillGetsItsSamples()
    {
        const int globalBatch = 8;
        const ulong seed = 500;
        Host.Calls.Hold = r => r.Seed == seed && r.Start == globalBatch;
        using var run = new CancellationTokenSource();
        try
        {
            using var source = await OpenAsync(seed, globalBatch, 1, 4, prefetch: true, run.Token);
            using (source.Fetch(0, Micro)) { }
            await Until(() => Host.Calls.Of(seed) is [_, { Held: true }], "the prefetch to reach the service");

            run.Cancel();
            await Until(() => Host.Calls.Of(seed)[1].CancelledWhileHeld, "the service to see the held prefetch cancelled");
            Host.Calls.ReleaseAll();
            // The step in flight when a run is cancelled still finishes (TrainingRun stops at the step boundary): its window
            // comes from a direct call, and no further prefetch starts.
            using (var t = source.Fetch(globalBatch, Micro))
                Assert.Equal(Host.ReadDirectly("train", seed, globalBatch, Micro), Values(t));
            Assert.Equal([0L, globalBatch, globalBatch], Host.Calls.Of(seed).Select(c => c.Start));
        }
        finally { Host.Calls.ReleaseAll(); }
    }
}

/// <summary>A stopped service: its own host, since the stop cannot be undone.</summary>
public class RemoteSampleSourceFailureTests
{
    [Fact]
    public async Task APrefetchThatFailsSurfacesOnTheFetchThatNeedsItNamingTheDatasetAndRange()
    {
        const int globalBatch = 8, micro = 2;
        await using var host = await DataShardsHost.StartAsync();
        const ulong seed = 600;
        host.Calls.Hold = r => r.Start == globalBatch;
        // Calls counted where they start, at the client: the service is gone when the failing fetch runs.
        var started = new StartedCalls();
        var client = new DataShards.DataShardsClient(host.Channel.Intercept(started));
        using var source = await RemoteSampleSource.OpenAsync(client, host.DatasetId, seed, DataShardsHost.SeqLen, 4 * globalBatch,
                                                              CancellationToken.None, readAhead: globalBatch, stride: globalBatch);
        for (int a = 0; a < globalBatch / micro; a++) using (source.Fetch(a * micro, micro)) { }
        await RemoteSampleSourceTests.Until(() => host.Calls.Of(seed) is [_, { Held: true }], "the prefetch to reach the service");

        await host.StopAsync(); // aborts the held call's connection
        var e = Assert.Throws<IOException>(() => source.Fetch(globalBatch, micro));
        Assert.Contains(host.DatasetId, e.Message);
        Assert.Contains($"[{globalBatch}, {2 * globalBatch})", e.Message);
        Assert.IsType<RpcException>(e.InnerException);
        // The error is the prefetch's own, not that of a second call made in its place.
        Assert.Equal(2, started.GetBatch);
    }

    sealed class StartedCalls : Interceptor
    {
        int getBatch;
        public int GetBatch => Volatile.Read(ref getBatch);

        public override AsyncServerStreamingCall<TResponse> AsyncServerStreamingCall<TRequest, TResponse>(TRequest request,
            ClientInterceptorContext<TRequest, TResponse> context, AsyncServerStreamingCallContinuation<TRequest, TResponse> continuation)
        {
            if (request is GetBatchRequest) Interlocked.Increment(ref getBatch);
            return continuation(request, context);
        }
    }
}
