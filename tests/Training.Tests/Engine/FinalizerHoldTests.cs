// The guard against TorchSharp's implicit-Scalar race: the finalizer thread is parked while a hold is open, and
// scalar arithmetic beside a thread that keeps the garbage collector busy gives no libtorch errors under it.
using System.Diagnostics;
using System.Runtime.CompilerServices;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class FinalizerHoldTests
{
    sealed class Probe(StrongBox<bool> finalized)
    {
        ~Probe() => finalized.Value = true;
    }

    /// <summary>Leaves a probe for the collector; the short weak reference is cleared when a collection finds it dead and queues its finalizer.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    static WeakReference Drop(StrongBox<bool> finalized) => new(new Probe(finalized), trackResurrection: false);

    static bool Eventually(Func<bool> condition, TimeSpan timeout)
    {
        var deadline = Stopwatch.StartNew();
        while (!condition())
        {
            if (deadline.Elapsed > timeout) return false;
            GC.Collect();
            Thread.Sleep(10); // a poll interval: the condition is checked again after each collection, up to the timeout
        }
        return true;
    }

    [Fact]
    public void NothingIsFinalizedWhileAHoldIsOpenAndEverythingIsAfterTheLastOneCloses()
    {
        var finalized = new StrongBox<bool>();
        using (FinalizerHold.Enter())
        {
            var nested = FinalizerHold.Enter();
            var probe = Drop(finalized);
            // First the condition that makes the rest mean something: a collection found the probe dead and queued its
            // finalizer (without it, "not finalized" below would hold for a probe still alive).
            Assert.True(Eventually(() => !probe.IsAlive, TimeSpan.FromSeconds(60)), "no collection found the probe dead within 60 s");
            // Its finalizer must wait for the hold. A bounded window, as any check that something does not happen needs:
            // a free finalizer thread runs a queued finalizer within milliseconds, and this one has 300 ms of collections.
            Assert.False(Eventually(() => finalized.Value, TimeSpan.FromMilliseconds(300)), "a finalizer ran inside a hold");
            nested.Dispose();
            Assert.False(Eventually(() => finalized.Value, TimeSpan.FromMilliseconds(100)), "closing the inner of two holds released the finalizer");
        }
        Assert.True(Eventually(() => finalized.Value, TimeSpan.FromSeconds(60)), "the finalizer did not run after the hold closed");
    }

    [Fact]
    public void ScalarArithmeticBesideAnAllocatingThreadGivesNoLibtorchErrorsUnderAHold()
    {
        // Without the hold this loop fails about once a second on a 2-core machine ("Expected false to be true" from
        // Scalar::toFloat): `x + 1e-20`, `add(y)` (alpha 1) and `* 0.5` each pass a Scalar that nothing keeps alive.
        using var x = ones(8, 8);
        using var y = ones(8, 8);
        bool stop = false;
        var garbage = new Thread(() => { while (!Volatile.Read(ref stop)) GC.KeepAlive(new byte[4096]); }) { IsBackground = true };
        garbage.Start();
        var errors = new List<string>();
        long parkedBefore = FinalizerHold.Parked, iterations = 0;
        try
        {
            // A fixed amount of work, not a time: under the hold the loop runs slower beside this allocator.
            while (iterations < 15_000)
            {
                using var hold = FinalizerHold.Enter();
                for (int i = 0; i < 500; i++, iterations++)
                {
                    try
                    {
                        using var z = x + 1e-20;
                        using var w = z.add(y);
                        using var v = w * 0.5;
                    }
                    catch (Exception e) { errors.Add(e.Message.Split('\n')[0]); }
                }
            }
        }
        finally { Volatile.Write(ref stop, true); garbage.Join(); }
        Assert.True(FinalizerHold.Parked > parkedBefore, "no hold parked the finalizer thread");
        Assert.True(errors.Count == 0, $"{errors.Count} libtorch errors in {iterations} iterations under a hold, first: {errors.FirstOrDefault()}");
    }
}
