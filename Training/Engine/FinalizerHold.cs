// Holds the .NET finalizer thread while a training step runs native libtorch code, so TorchSharp's implicit Scalars
// cannot be freed under libtorch's feet.
using System.Runtime.CompilerServices;

namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// TorchSharp 0.107 passes a <c>Scalar</c>'s native handle to libtorch without keeping the managed object alive: in
/// <c>a + b</c> (that is <c>add(b, alpha: 1)</c>) or <c>a * 0.5</c> the implicit Scalar is garbage as soon as its handle
/// has been read. A garbage collection triggered by another thread (a checkpoint upload, gRPC, the heartbeat) during the
/// native call can queue it for finalization, and the finalizer thread then frees the native scalar while libtorch still
/// reads it. glibc overwrites the freed tag and libtorch fails in <c>Scalar::toFloat</c> with
/// "Expected false to be true" (measured: 31 failures in 655,000 <c>x + 1e-20; z.add(y); w * 0.5</c> iterations beside
/// one allocating thread, on this project's CI machine). Nothing the caller can dispose: TorchSharp creates these
/// Scalars itself.
/// <para>
/// While a hold is open the finalizer thread is parked inside the finalizer of a sentinel object, so whatever a
/// collection finds dead is freed only after the hold closes, when no native call of the step can still use it. Holds
/// nest and may be taken by several threads at once; the finalizer runs again when the last one closes. Opening a hold
/// costs one gen-0 collection.
/// </para>
/// </summary>
public static class FinalizerHold
{
    /// <summary>
    /// The longest the finalizer thread stays parked for one hold. A step that takes longer is unprotected for the rest
    /// of it; the bound keeps code that waits for finalizers (libtorch's out-of-memory retry path calls
    /// <c>GC.WaitForPendingFinalizers</c>) from waiting forever on the thread that holds.
    /// </summary>
    public static readonly TimeSpan MaxHold = TimeSpan.FromMinutes(2);

    static readonly Lock sync = new();
    static int holders;
    static ManualResetEventSlim? release;

    /// <summary>Number of holds that found the finalizer thread parked (for tests and diagnostics).</summary>
    public static long Parked => Interlocked.Read(ref parked);
    static long parked;

    /// <summary>Parks the finalizer thread until the returned scope is disposed (and every other hold has closed).</summary>
    public static Scope Enter()
    {
        lock (sync)
        {
            if (holders++ > 0) return new Scope(true);
            var opened = new ManualResetEventSlim();
            release = new ManualResetEventSlim();
            Plant(opened, release);
            // The sentinel is in gen 0 and unreachable: a gen-0 collection queues it. The finalizer thread reaches it
            // after whatever was queued before; wait for that, collecting again in case a collection raced the plant.
            // A collection on another thread may have promoted it first: each retry collects one generation higher.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            int generation = 0;
            do GC.Collect(Math.Min(generation++, GC.MaxGeneration), GCCollectionMode.Forced, blocking: true);
            while (!opened.Wait(TimeSpan.FromMilliseconds(20)) && DateTime.UtcNow < deadline);
            if (opened.IsSet) Interlocked.Increment(ref parked);
            return new Scope(true);
        }
    }

    static void Exit()
    {
        lock (sync)
        {
            if (--holders > 0) return;
            release?.Set();
            release = null;
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static void Plant(ManualResetEventSlim opened, ManualResetEventSlim release) => _ = new Sentinel(opened, release);

    sealed class Sentinel(ManualResetEventSlim opened, ManualResetEventSlim release)
    {
        ~Sentinel()
        {
            opened.Set();
            release.Wait(MaxHold);
        }
    }

    /// <summary>An open hold; dispose it (once) at the end of the step.</summary>
    public struct Scope(bool open) : IDisposable
    {
        bool open = open;

        public void Dispose()
        {
            if (!open) return;
            open = false;
            Exit();
        }
    }
}
