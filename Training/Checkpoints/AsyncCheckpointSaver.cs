// Saves a rank's checkpoint share in the background: copy to host at a step boundary, write and upload while training goes on.
using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>What one <see cref="AsyncCheckpointSaver.Save"/> or <see cref="AsyncCheckpointSaver.BeginSave"/> call did.</summary>
/// <param name="Started">False when the previous save was still running: this one was skipped.</param>
/// <param name="Stall">
/// Time the calling (training) thread spent in the call: the host copy for <see cref="AsyncCheckpointSaver.Save"/>, only
/// the start of it for <see cref="AsyncCheckpointSaver.BeginSave"/> (the rest is in <see cref="AsyncCheckpointSaver.WaitForSnapshot"/>).
/// </param>
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
/// <para>
/// Two ways to take the snapshot. <see cref="Save"/> copies before it returns (on this thread and a helper). With
/// <see cref="BeginSave"/> the copy runs on a background thread while the next step's forward and backward passes run,
/// which read the parameters and optimizer moments but change none: the caller must call <see cref="WaitForSnapshot"/>
/// before anything changes the saved tensors (the optimizer update; the trainer's <c>BeforeStateChange</c> hook),
/// and then helps finish the copy instead of idling. The snapshot is the state at the step boundary either way.
/// </para>
/// <para>
/// The background work (the copy, the hashes, the write) runs on a thread of its own, which can run at a lower CPU
/// priority (<see cref="BackgroundNice"/>) so that where it shares cores with the training step the step's threads run
/// first. <see cref="Prepare"/> allocates and faults in the host copies before the first save, which otherwise does it
/// beside a step and leaves the training thread to help fault in what is not done by the optimizer update.
/// </para>
/// </summary>
public sealed class AsyncCheckpointSaver(ICheckpointSink sink, ShardingPlan plan, int rank,
    Func<SaveOutcome, CancellationToken, Task>? onFinished = null) : IAsyncDisposable
{
    Task<SaveOutcome>? inFlight;
    HostCopy? copying;     // the snapshot being copied from the live tensors, until a WaitForSnapshot sees it done
    HostSnapshot? buffers; // the last save's host copies; the background write reads them until inFlight completes
    Exception? unreported;
    readonly CancellationTokenSource stopping = new();
    Task<HostSnapshot>? preparing; // Prepare's buffers, until the first save (or the end) takes them
    volatile bool stopPreparing;

    /// <summary>
    /// How many nice steps (0 to 19) below the process's threads the thread that copies, hashes and writes in the
    /// background runs, and <see cref="Prepare"/>'s thread; Linux sets it per thread (capped at nice 19). 0 by default:
    /// on the shared 2-core VM, saves at 10 stalled the steps around them no less than at 0 (docs/benchmarks.md,
    /// Checkpoints), so there is no measured reason to let a save run longer. The training thread's own share of the
    /// copy (<see cref="WaitForSnapshot"/>) always keeps its priority.
    /// </summary>
    public int BackgroundNice { get; init; }

    /// <summary>
    /// Torch intra-op threads the training thread gives up while a save's background work runs (0: none, the default).
    /// On a CPU whose every core runs the step, the save's thread can only take a core from one of torch's threads, and
    /// every parallel op then waits on that starved thread; with one thread fewer the step runs undisturbed beside the
    /// save (docs/benchmarks.md, Checkpoints). torch's thread count is the calling thread's own (OpenMP), so it is
    /// lowered in <see cref="BeginSave"/> and given back in the first <see cref="BeginSave"/>, <see cref="WaitForSnapshot"/>
    /// or <see cref="RestoreThreads"/> that finds the save done: all on the training thread. At least one thread stays.
    /// A caller that ends with <see cref="WaitAsync"/> (which may resume on another thread) calls <see cref="RestoreThreads"/>
    /// on the training thread afterwards.
    /// </summary>
    public int YieldTorchThreads { get; init; }

    int? yieldedFrom; // the training thread's torch thread count before a save lowered it

    /// <summary>
    /// Gives the training thread its torch threads back once no save runs (or at once, <paramref name="evenIfBusy"/>: the
    /// end of a run, whose thread must not keep fewer); call on the training thread.
    /// </summary>
    public void RestoreThreads(bool evenIfBusy = false)
    {
        if (yieldedFrom is not { } threads || Busy && !evenIfBusy) return;
        set_num_threads(threads);
        yieldedFrom = null;
    }

    void YieldThreads()
    {
        if (YieldTorchThreads <= 0 || yieldedFrom is not null) return;
        int threads = get_num_threads();
        if (threads <= 1) return;
        set_num_threads(Math.Max(1, threads - YieldTorchThreads));
        yieldedFrom = threads;
    }

    /// <summary>Tests: awaited by the background thread before it copies anything, to fix an interleaving with the training thread.</summary>
    internal Func<Task>? BeforeBackgroundCopy { get; set; }

    /// <summary>Training-thread time of the last save: its <see cref="SaveRequest.Stall"/> plus its <see cref="WaitForSnapshot"/>.</summary>
    public TimeSpan LastStall { get; private set; }
    public TimeSpan TotalStall { get; private set; }
    public int Started { get; private set; }
    public int Skipped { get; private set; }
    public int Failed { get; private set; }
    public SaveOutcome? LastOutcome { get; private set; }
    public bool Busy => inFlight is { IsCompleted: false };
    /// <summary>A snapshot started by <see cref="BeginSave"/> may still be reading the live tensors.</summary>
    public bool SnapshotPending => copying is not null;

    /// <summary>
    /// Call at a step boundary, on the training thread, with this rank's live tensors (by checkpoint name); returns once
    /// the host copy is taken, so the tensors may change right after.
    /// </summary>
    public SaveRequest Save(long step, IReadOnlyDictionary<string, Tensor> tensors)
    {
        var request = BeginSave(step, tensors);
        if (!request.Started) return request;
        var waited = WaitForSnapshot() ?? TimeSpan.Zero;
        return request with { Stall = request.Stall + waited };
    }

    /// <summary>
    /// Call at a step boundary, on the training thread, with this rank's live tensors; returns at once while a background
    /// thread copies them. Until <see cref="WaitForSnapshot"/> returns, nothing may change, dispose or move those tensors.
    /// </summary>
    public SaveRequest BeginSave(long step, IReadOnlyDictionary<string, Tensor> tensors)
    {
        var sw = Stopwatch.StartNew();
        WaitForSnapshot(); // a caller that skipped it: the previous copy must be over before anything else
        Collect();
        RestoreThreads();
        var failure = unreported;
        unreported = null;
        if (Busy)
        {
            Skipped++;
            return new SaveRequest(step, false, sw.Elapsed, failure);
        }
        TakePrepared();
        var previous = buffers;
        buffers = null; // the copy owns them now: it refills them or, failing, disposes them
        var copy = new HostCopy(plan, rank, step, tensors, previous);
        copying = copy;
        inFlight = Task.Run(() => CopyAndWrite(copy));
        YieldThreads();
        Started++;
        LastStall = sw.Elapsed;
        TotalStall += LastStall;
        return new SaveRequest(step, true, LastStall, failure);
    }

    /// <summary>
    /// Blocks until the snapshot of the last <see cref="BeginSave"/> no longer reads the live tensors, helping to copy
    /// meanwhile; returns the time this thread spent here, or null when no snapshot was pending. A failed copy is not
    /// thrown: it is the save's outcome, reported like a failed write.
    /// </summary>
    public TimeSpan? WaitForSnapshot()
    {
        RestoreThreads();
        if (copying is not { } copy) return null;
        var sw = Stopwatch.StartNew();
        copy.Help();
        copy.Completed.GetAwaiter().GetResult();
        copying = null;
        var waited = sw.Elapsed;
        LastStall += waited;
        TotalStall += waited;
        return waited;
    }

    /// <summary>
    /// A scope whose end waits for a pending snapshot: the live tensors are the caller's again after it, however it ends,
    /// and the training thread (which ends it) has its torch threads back even if a write is still running.
    /// </summary>
    public IDisposable SnapshotScope() => new SnapshotWait(this);

    sealed class SnapshotWait(AsyncCheckpointSaver saver) : IDisposable
    {
        public void Dispose()
        {
            saver.WaitForSnapshot();
            saver.RestoreThreads(evenIfBusy: true);
        }
    }

    /// <summary>
    /// Allocates and faults in, on a background thread (at <see cref="BackgroundNice"/>), the host copies a save of these tensors (this
    /// rank's slices of them: the live tensors by checkpoint name) fills, so that the first save refills them like every
    /// later one instead of allocating and faulting in the rank's whole state inside a training step. Only the
    /// tensors' shapes, dtypes and devices are read, on the calling thread; their values are not touched. The memory
    /// is the host copy every save keeps from then on anyway, never a second one: nothing happens when the saver
    /// already holds its copies or is preparing them. A save that begins before the preparation is done stops it and
    /// uses what it made. The returned task completes when the preparation ends (done, stopped, or failed, out of host
    /// memory say: the save then allocates what is missing, and reports the failure if it fails again). It never throws.
    /// </summary>
    public Task Prepare(IReadOnlyDictionary<string, Tensor> tensors)
    {
        if (buffers is not null || inFlight is not null || preparing is not null) return preparing ?? Task.CompletedTask;
        var wanted = new List<(string Name, long[] Shape, ScalarType Dtype, bool Pinned)>();
        foreach (var s in plan.WritesOf(rank))
        {
            if (!tensors.TryGetValue(s.Name, out var t)) continue; // the save names it when it fails
            long[] shape = t.dim() == 0 ? [] : [s.RowCount, .. t.shape.AsSpan(1)];
            wanted.Add((s.Name, shape, t.dtype, t.device_type == DeviceType.CUDA));
        }
        stopPreparing = false;
        int nice = BackgroundNice;
        preparing = Task.Run(() => BackgroundPriority.Run(nice, $"ckpt-prepare-r{rank}", () =>
        {
            var made = new List<KeyValuePair<string, Tensor>>(wanted.Count);
            try
            {
                foreach (var (name, shape, dtype, pinned) in wanted)
                {
                    if (stopPreparing) break;
                    var buffer = ShardedCheckpointWriter.NewHostBuffer(shape, dtype, pinned);
                    made.Add(new(name, buffer));
                    if (!Touch(buffer)) break;
                }
            }
            // Nothing of a failure here may reach the training thread (BeginSave takes the result): the save allocates
            // whatever is missing itself, and reports that if it fails.
            catch (Exception) { }
            return new HostSnapshot(-1, rank, made);
        }));
        return preparing;
    }

    /// <summary>Writes every page of a new CPU buffer, a piece at a time so that a save can stop it between pieces; false when stopped.</summary>
    bool Touch(Tensor buffer)
    {
        if (buffer.numel() == 0) return true;
        using var flat = buffer.view(-1);
        long perPiece = Math.Max(1, HostCopy.PieceBytes / buffer.ElementSize), n = flat.numel();
        for (long i = 0; i < n; i += perPiece)
        {
            if (stopPreparing) return false;
            using var piece = flat.narrow(0, i, Math.Min(perPiece, n - i));
            piece.bytes.Clear();
        }
        return true;
    }

    /// <summary>Makes Prepare's buffers (all of them, or those made before it was stopped) the ones the next save refills.</summary>
    void TakePrepared()
    {
        if (preparing is not { } p) return;
        stopPreparing = true;
        var prepared = p.GetAwaiter().GetResult(); // stops between two 8 MiB pieces
        preparing = null;
        if (buffers is null) buffers = prepared;
        else prepared.Dispose();
    }

    /// <summary>
    /// The save in the background: on a thread of its own at <see cref="BackgroundNice"/>, its share of the copy and then
    /// the file (hashed as it is written, fsynced); then, on this pool thread at normal priority, the publish and the
    /// caller's callback.
    /// </summary>
    SaveOutcome CopyAndWrite(HostCopy copy)
    {
        var sw = Stopwatch.StartNew();
        HostSnapshot? snapshot = null;
        ManifestFile written;
        try
        {
            written = BackgroundPriority.Run(BackgroundNice, $"ckpt-save-r{rank}", () =>
            {
                try
                {
                    if (BeforeBackgroundCopy is { } hold) hold().GetAwaiter().GetResult();
                    copy.Help();
                    copy.Completed.GetAwaiter().GetResult(); // a blocking wait: the training thread may still copy its last piece
                    snapshot = copy.Take();
                }
                catch (Exception) // out of host memory, a tensor missing: the run goes on without this checkpoint
                {
                    copy.Dispose();
                    throw;
                }
                buffers = snapshot;
                return RankFileWriter.Write(sink.LocalPath(snapshot.Step, rank), snapshot.Slices, sink.HashChunkBytes, sink.HashChunkAlgorithm);
            });
        }
        catch (Exception e)
        {
            return Notify(new SaveOutcome(copy.Step, null, e, sw.Elapsed)); // the snapshot, if taken, stays: the next save refills it
        }
        SaveOutcome outcome;
        try
        {
            var file = sink.PublishAsync(snapshot!.Step, rank, written, stopping.Token).GetAwaiter().GetResult();
            outcome = new SaveOutcome(snapshot.Step, file, null, sw.Elapsed);
        }
        catch (Exception e)
        {
            outcome = new SaveOutcome(snapshot!.Step, null, e, sw.Elapsed);
        }
        return Notify(outcome);
    }

    /// <summary>
    /// Tells the caller of every outcome, failures too, so it can report which step could not be stored (the error still
    /// comes back once through Save/WaitAsync). A stored file whose report fails is a failed save; a failed save's report adds nothing.
    /// </summary>
    SaveOutcome Notify(SaveOutcome outcome)
    {
        if (onFinished is null) return outcome;
        try { onFinished(outcome, stopping.Token).GetAwaiter().GetResult(); }
        catch (Exception e) when (outcome.Error is null) { outcome = outcome with { File = null, Error = e }; }
        catch (Exception) when (outcome.Error is not null) { }
        return outcome;
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
        copying = null; // the write is done, so its copy was
        Collect();
        var failure = unreported;
        unreported = null;
        return failure;
    }

    /// <summary>
    /// The host copies the next save will refill (tests check they are reused): a finished <see cref="Prepare"/>'s, or
    /// the last save's; empty before either.
    /// </summary>
    public IReadOnlyList<KeyValuePair<string, Tensor>> HostBuffers =>
        buffers?.Slices ?? (preparing is { IsCompletedSuccessfully: true } p ? p.Result.Slices : []);

    public async ValueTask DisposeAsync()
    {
        await WaitAsync();
        TakePrepared();
        buffers?.Dispose();
        buffers = null;
        stopping.Dispose();
    }
}
