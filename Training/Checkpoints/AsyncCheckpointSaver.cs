// Saves a rank's checkpoint share in the background: copy to host at a step boundary, write and upload while training goes on.
using System.Diagnostics;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>What one <see cref="AsyncCheckpointSaver.Save"/> call did.</summary>
/// <param name="Started">False when the previous save was still running: this one was skipped.</param>
/// <param name="Stall">Time the calling (training) thread spent in the call: the host copy.</param>
/// <param name="PreviousFailure">The error of a background save that failed since the last call, reported once.</param>
public sealed record SaveRequest(long Step, bool Started, TimeSpan Stall, Exception? PreviousFailure);

/// <summary>A background save that finished: the rank's published file, or why it failed.</summary>
public sealed record SaveOutcome(long Step, ManifestFile? File, Exception? Error, TimeSpan Duration);

/// <summary>
/// At most one save in flight per rank. A request that arrives while one runs is skipped, not queued: waiting would
/// stall training for the whole write (the thing this class exists to avoid), and a queue would hold a second host
/// copy of the state; the next checkpoint interval saves again. Failures never throw into training: they come back
/// once, in the next <see cref="Save"/>'s result and in <see cref="WaitAsync"/>. The host copies are kept from one save to
/// the next and refilled in place: allocating and faulting in the rank's whole state every interval was most of the
/// stall. They are touched only when no write is in flight (a skipped request never reaches them), and freed with the saver.
/// </summary>
public sealed class AsyncCheckpointSaver(ICheckpointSink sink, ShardingPlan plan, int rank,
    Func<SaveOutcome, CancellationToken, Task>? onFinished = null) : IAsyncDisposable
{
    Task<SaveOutcome>? inFlight;
    HostSnapshot? buffers; // the last save's host copies; the background write reads them until inFlight completes
    Exception? unreported;
    readonly CancellationTokenSource stopping = new();

    public TimeSpan LastStall { get; private set; }
    public TimeSpan TotalStall { get; private set; }
    public int Started { get; private set; }
    public int Skipped { get; private set; }
    public int Failed { get; private set; }
    public SaveOutcome? LastOutcome { get; private set; }
    public bool Busy => inFlight is { IsCompleted: false };

    /// <summary>Call at a step boundary, on the training thread, with this rank's live tensors (by checkpoint name).</summary>
    public SaveRequest Save(long step, IReadOnlyDictionary<string, Tensor> tensors)
    {
        var sw = Stopwatch.StartNew();
        Collect();
        var failure = unreported;
        unreported = null;
        if (Busy)
        {
            Skipped++;
            return new SaveRequest(step, false, sw.Elapsed, failure);
        }
        HostSnapshot snapshot;
        var previous = buffers;
        buffers = null; // CopyToHost owns them now: it refills them or, failing, disposes them
        try { snapshot = ShardedCheckpointWriter.CopyToHost(plan, rank, step, tensors, reuse: previous); }
        catch (Exception e) // out of host memory, a tensor missing: the run goes on without this checkpoint
        {
            Failed++;
            return new SaveRequest(step, false, sw.Elapsed, failure ?? e);
        }
        buffers = snapshot;
        inFlight = Task.Run(() => WriteAsync(snapshot));
        Started++;
        LastStall = sw.Elapsed;
        TotalStall += LastStall;
        return new SaveRequest(step, true, LastStall, failure);
    }

    async Task<SaveOutcome> WriteAsync(HostSnapshot snapshot)
    {
        var sw = Stopwatch.StartNew();
        SaveOutcome outcome;
        try
        {
            var file = await ShardedCheckpointWriter.WriteRankAsync(sink, snapshot, stopping.Token);
            outcome = new SaveOutcome(snapshot.Step, file, null, sw.Elapsed);
        }
        catch (Exception e)
        {
            outcome = new SaveOutcome(snapshot.Step, null, e, sw.Elapsed);
        }
        // Told of failures too, so the caller can report which step could not be stored (the error still comes back once
        // through Save/WaitAsync). A stored file whose report fails is a failed save; a failed save's report adds nothing.
        if (onFinished is not null)
        {
            try { await onFinished(outcome, stopping.Token); }
            catch (Exception e) when (outcome.Error is null) { outcome = outcome with { File = null, Error = e }; }
            catch (Exception) when (outcome.Error is not null) { }
        }
        return outcome; // the snapshot stays: the next save refills it

    }

    /// <summary>Takes the finished save's outcome, keeping its error for the next report.</summary>
    void Collect()
    {
        if (inFlight is not { IsCompleted: true } done) return;
        inFlight = null;
        LastOutcome = done.Result; // WriteAsync catches everything
        if (LastOutcome.Error is { } e) { Failed++; unreported = e; }
    }

    /// <summary>Waits for the save in flight (end of training, tests); returns the unreported failure, if any.</summary>
    public async Task<Exception?> WaitAsync()
    {
        if (inFlight is { } running) await running;
        Collect();
        var failure = unreported;
        unreported = null;
        return failure;
    }

    /// <summary>The host copies the next save will refill (tests check they are reused); empty before the first save.</summary>
    public IReadOnlyList<KeyValuePair<string, Tensor>> HostBuffers => buffers?.Slices ?? [];

    public async ValueTask DisposeAsync()
    {
        await WaitAsync();
        buffers?.Dispose();
        buffers = null;
        stopping.Dispose();
    }
}
