// The bytes glibc's malloc holds for the process: how tests measure what tensors a piece of the model keeps alive.
using System.Runtime.InteropServices;

namespace DeepSeekCluster.Training.Tests;

/// <summary>
/// libtorch allocates CPU tensors through malloc, so a tensor kept adds its bytes here at once, whatever glibc's mapping
/// threshold is (resident pages would not: a freed chunk below the threshold stays resident and is reused).
/// </summary>
static class MallocHeap
{
    [StructLayout(LayoutKind.Sequential)]
    struct MallInfo2 { public nuint Arena, Ordblks, Smblks, Hblks, Hblkhd, Usmblks, Fsmblks, Uordblks, Fordblks, Keepcost; }

    [DllImport("libc", EntryPoint = "mallinfo2")]
    static extern MallInfo2 MallInfo();

    /// <summary>Every arena's chunks in use and every mapped block, after the .NET finalizers have freed what they own.</summary>
    public static long BytesInUse()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        return BytesInUseNow();
    }

    /// <summary>Every arena's chunks in use and every mapped block as they are (no collection): what a sampler reads while a backward runs.</summary>
    public static long BytesInUseNow()
    {
        var m = MallInfo();
        return (long)m.Uordblks + (long)m.Hblkhd;
    }

    /// <summary>
    /// The most bytes in use seen by a thread that reads them without pause from <see cref="StartPeak"/> until the
    /// returned function is called. A read can miss a short peak (a thread not scheduled then), never invent one.
    /// </summary>
    public static Func<long> StartPeak()
    {
        long peak = BytesInUseNow();
        bool stop = false;
        var sampler = new Thread(() =>
        {
            while (!Volatile.Read(ref stop)) peak = Math.Max(peak, BytesInUseNow());
        }) { IsBackground = true, Priority = ThreadPriority.Highest, Name = "malloc peak sampler" };
        sampler.Start();
        return () =>
        {
            Volatile.Write(ref stop, true);
            sampler.Join();
            return Math.Max(peak, BytesInUseNow());
        };
    }
}
