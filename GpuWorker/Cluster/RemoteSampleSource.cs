// Training samples fetched from DataShardService by global index: only this rank's part of each step travels, in one
// call per step (the read-ahead), and the next step's part is fetched in the background while this step computes (the
// prefetch). Not thread-safe: one caller fetches, as the trainer does. What a fetch returned is recorded by the global
// indices the service's replies carried (TakeServed): the step report tells the exactly-once ledger those.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Parallel;
using Grpc.Core;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class RemoteSampleSource : ISampleSource, IDisposable
{
    readonly DataShards.DataShardsClient client;
    readonly string dataset;
    readonly ulong seed;
    readonly int epochs;
    readonly string split;
    readonly int readAhead;
    readonly long stride;
    readonly long limit;
    readonly TimeSpan? silenceTimeout;
    /// <summary>The run's abort: a fetch the trainer waits for is given up with its step.</summary>
    readonly CancellationToken abort;
    /// <summary>Cancelled by the run's token or by Dispose: ends a prefetch in flight.</summary>
    readonly CancellationTokenSource lifetime;
    readonly ServedRanges served = new();
    Window? current;
    Prefetch? pending;
    bool disposed;

    public int SeqLen { get; }
    public long SampleCount { get; }

    /// <param name="readAhead">
    /// Samples one call asks for when a fetch misses: the rank's share of a step, whose micro-batches the trainer then
    /// fetches in order. Each GetBatch call costs both processes CPU that a small step feels (the cluster bench measured
    /// ~11 ms of DataShardService CPU per call of 4 samples on the 2-core VM); 0 fetches exactly what is asked.
    /// </param>
    /// <param name="stride">
    /// Global indices between one step's window of this rank and the next's (the global batch): once a window is in hand,
    /// the one <paramref name="stride"/> further on is fetched in the background, so the next step's first fetch finds it
    /// ready. 0 (or a read-ahead of 0) prefetches nothing.
    /// </param>
    /// <param name="totalSamples">Global indices the job consumes; no call asks at or past it unless a fetch itself does. 0: the epochs' end.</param>
    /// <param name="ct">The run's token: cancelling it cancels a prefetch in flight (a fetch the trainer makes still completes, unless <paramref name="abort"/> ends it).</param>
    /// <param name="abort">
    /// The run's abort (RunCancellation.Abort, a grace after the Stop): it ends a fetch the trainer waits for, as it ends a
    /// blocked collective, so that a data service that stopped answering in the middle of a step cannot hold the run, and
    /// the Stop or re-formation that waits for it, for ever. The step is given up either way once the run is aborted.
    /// </param>
    /// <param name="silenceTimeout">
    /// A call that gets no sample from the service for this long fails with an IOException naming the dataset and the
    /// samples (null: it waits as long as the service takes). Rank 0's validation at the end of a job sets it: it runs
    /// after the job's Stop, which no longer reaches a fetch.
    /// </param>
    public RemoteSampleSource(DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long sampleCount, int epochs,
                              string split = "train", int readAhead = 0, long stride = 0, long totalSamples = 0, CancellationToken ct = default,
                              TimeSpan? silenceTimeout = null, CancellationToken abort = default)
    {
        this.silenceTimeout = silenceTimeout;
        this.abort = abort;
        ArgumentOutOfRangeException.ThrowIfNegative(stride);
        // At most ~4 M tokens a window (32 MiB; two with a prefetch): a huge global batch of long sequences falls back to
        // fetching less at a time.
        this.readAhead = Math.Clamp(readAhead, 0, Math.Max(1, (4 << 20) / (seqLen + 1)));
        this.split = split;
        this.client = client;
        this.dataset = dataset;
        this.seed = seed;
        this.epochs = Math.Max(1, epochs);
        this.stride = stride;
        SeqLen = seqLen;
        SampleCount = sampleCount;
        limit = totalSamples > 0 ? Math.Min(totalSamples, sampleCount * this.epochs) : sampleCount * this.epochs;
        lifetime = CancellationTokenSource.CreateLinkedTokenSource(ct);
    }

    /// <summary>Connects to the dataset and checks it fits the job (sequence length).</summary>
    public static async Task<RemoteSampleSource> OpenAsync(DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long totalSamples,
                                                           CancellationToken ct, string split = "train", int readAhead = 0, long stride = 0) =>
        For(await client.GetManifestAsync(new GetManifestRequest { DatasetId = dataset }, cancellationToken: ct),
            client, dataset, seed, seqLen, totalSamples, ct, split, readAhead, stride);

    /// <summary><see cref="OpenAsync"/> for a run's own thread, with <paramref name="manifest"/> already in hand.</summary>
    public static RemoteSampleSource For(GetManifestReply manifest, DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long totalSamples,
                                         CancellationToken ct, string split = "train", int readAhead = 0, long stride = 0, TimeSpan? silenceTimeout = null,
                                         CancellationToken abort = default)
    {
        var m = manifest;
        if (m.SeqLen != seqLen)
            throw new InvalidDataException($"dataset {dataset} was packed with seq_len {m.SeqLen}, the job trains with {seqLen}");
        long samples = split == "validation" ? m.ValidationSamples : m.TrainSamples;
        if (samples == 0) throw new InvalidDataException($"dataset {dataset} has no {split} samples");
        int epochs = (int)Math.Max(1, (totalSamples + samples - 1) / samples);
        return new RemoteSampleSource(client, dataset, seed, seqLen, samples, epochs, split, readAhead, stride, totalSamples, ct, silenceTimeout, abort);
    }

    public Tensor Fetch(long globalStart, int count)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (current is null || !current.Covers(globalStart, count))
        {
            current = TakePrefetched(globalStart, count)
                      // A miss: this and the next samples up to the read-ahead, never past the job's last global index.
                      ?? TrainingThread.Wait(Download(globalStart, (int)Math.Max(count, Math.Min(readAhead, limit - globalStart)), abort));
            if (pending is null) StartPrefetch(current.Start + stride);
        }
        int row = SeqLen + 1;
        long first = globalStart - current.Start;
        var tokens = new long[count * row];
        Array.Copy(current.Tokens, first * row, tokens, 0, tokens.Length);
        for (long i = first; i < first + count; i++) served.Add(current.Indices[i]);
        return tensor(tokens, [count, row], ScalarType.Int64);
    }

    public IReadOnlyList<SampleRange> TakeServed() => served.Take();

    /// <summary>Cancels a prefetch in flight and waits for its call to end.</summary>
    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        lifetime.Cancel();
        Discard();
        lifetime.Dispose();
    }

    // ---- Prefetch ----

    /// <summary>The prefetched window if it holds [globalStart, globalStart + count); null when the fetch must call itself.</summary>
    Window? TakePrefetched(long globalStart, int count)
    {
        if (pending is not { } p) return null;
        if (!p.Covers(globalStart, count))
        {
            // Still ahead of the reader (a window larger than the read-ahead cap, fetched in pieces): it will be wanted.
            if (globalStart < p.Start) return null;
            Discard();
            return null;
        }
        pending = null;
        try { return TrainingThread.Wait(p.Call); }
        // Cancelled by the run: the step in flight still gets its samples, by a direct call as without the prefetch.
        catch (Exception) when (p.Cancel.IsCancellationRequested) { return null; }
        finally { p.Cancel.Dispose(); }
    }

    void StartPrefetch(long start)
    {
        if (stride == 0 || readAhead == 0 || start >= limit || lifetime.IsCancellationRequested) return;
        int count = (int)Math.Min(readAhead, limit - start);
        var cancel = CancellationTokenSource.CreateLinkedTokenSource(lifetime.Token);
        // Task.Run: the call starts on the pool, never inside the trainer's step.
        pending = new Prefetch(start, count, cancel, Task.Run(() => Download(start, count, cancel.Token)));
    }

    /// <summary>Cancels the prefetch in flight, if any, and waits until its call has ended: at most one call is ever outstanding.</summary>
    void Discard()
    {
        if (pending is not { } p) return;
        pending = null;
        p.Cancel.Cancel();
        // Its window is not wanted, so neither is its outcome (the cancellation, or an error no fetch needs).
        TrainingThread.WaitEnded(p.Call);
        p.Cancel.Dispose();
    }

    // ---- Calls ----

    async Task<Window> Download(long globalStart, int count, CancellationToken ct)
    {
        int row = SeqLen + 1;
        var tokens = new long[count * row];
        var indices = new long[count];
        int got = 0;
        using var silence = new CallSilence(silenceTimeout ?? Timeout.InfiniteTimeSpan, ct);
        try
        {
            using var call = client.GetBatch(new GetBatchRequest { DatasetId = dataset, Split = split, Seed = seed, Start = globalStart, Count = count, Epochs = epochs },
                                             cancellationToken: silence.Token);
            while (await call.ResponseStream.MoveNext(silence.Token))
            {
                silence.Progress();
                var s = call.ResponseStream.Current;
                if (s.Tokens.Count != row)
                    throw new InvalidDataException($"dataset {dataset}: sample {s.GlobalIndex} has {s.Tokens.Count} tokens, expected {row}");
                if (got == count) throw new InvalidDataException($"dataset {dataset}: asked for {count} samples from {globalStart}, got more");
                for (int i = 0; i < row; i++) tokens[got * row + i] = s.Tokens[i];
                indices[got] = s.GlobalIndex;
                got++;
            }
        }
        catch (Exception e) when (silence.Ended(e))
        {
            throw new IOException($"dataset {dataset}: fetching {split} samples [{globalStart}, {globalStart + count}) failed: the data service sent nothing for {silenceTimeout!.Value.TotalSeconds:0.#} s", e);
        }
        catch (RpcException e) when (!ct.IsCancellationRequested)
        {
            throw new IOException($"dataset {dataset}: fetching {split} samples [{globalStart}, {globalStart + count}) failed: {e.Status.StatusCode}: {e.Status.Detail}", e);
        }
        if (got != count) throw new InvalidDataException($"dataset {dataset}: asked for {count} samples from {globalStart}, got {got}");
        return new Window(globalStart, count, tokens, indices);
    }

    /// <summary>
    /// Samples [Start, Start + Count) of the global index as asked, (Count, SeqLen + 1) tokens row by row, and the global
    /// index each row's reply carried (what the service says it served).
    /// </summary>
    sealed record Window(long Start, int Count, long[] Tokens, long[] Indices)
    {
        public bool Covers(long start, int count) => start >= Start && start + count <= Start + Count;
    }

    sealed record Prefetch(long Start, int Count, CancellationTokenSource Cancel, Task<Window> Call)
    {
        public bool Covers(long start, int count) => start >= Start && start + count <= Start + Count;
    }
}
