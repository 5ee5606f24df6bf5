// Lowers the CPU priority of the thread that calls it: checkpoint work that must not slow the training step it runs beside.
using System.Runtime.InteropServices;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// On Linux every thread has its own nice value (setpriority with a thread id), which .NET's <see cref="Thread.Priority"/>
/// does not set; any thread may raise its own nice value (lower its priority) without privileges, but not lower it again
/// without CAP_SYS_NICE, so only threads created for the purpose are lowered, never pool threads. A thread inherits the
/// nice value of the thread that creates it, and .NET's thread pool creates its workers on whichever thread queues work
/// when it needs one: a lowered thread that completes a task with asynchronous continuations can leave the pool a worker
/// at low priority for good. So <see cref="Run{T}"/> lowers a thread of its own that only computes, and the caller, at
/// normal priority, waits for it and does the rest (completing tasks, publishing, callbacks).
/// </summary>
internal static partial class BackgroundPriority
{
    const int PrioProcess = 0; // PRIO_PROCESS: with a thread id, one thread

    [LibraryImport("libc", SetLastError = true)]
    private static partial int setpriority(int which, int who, int prio);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int getpriority(int which, int who);

    [LibraryImport("libc")]
    private static partial int gettid();

    /// <summary>
    /// Runs <paramref name="work"/> on a new thread <paramref name="nice"/> nice steps below the caller and returns its result (or throws its
    /// exception) on the calling thread, which blocks meanwhile. <paramref name="work"/> must not queue anything to the
    /// thread pool (no awaits, no task completions with asynchronous continuations): see the class remarks.
    /// </summary>
    public static T Run<T>(int nice, string name, Func<T> work)
    {
        T result = default!;
        System.Runtime.ExceptionServices.ExceptionDispatchInfo? failure = null;
        var thread = new Thread(() =>
        {
            try
            {
                LowerCurrentThread(nice);
                result = work();
            }
            catch (Exception e) { failure = System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e); }
        }) { IsBackground = true, Name = name };
        thread.Start();
        thread.Join();
        failure?.Throw();
        return result;
    }

    /// <summary>The calling thread's kernel id (Linux), as in /proc/self/task/&lt;tid&gt;; null elsewhere.</summary>
    public static int? CurrentThreadId => OperatingSystem.IsLinux() ? gettid() : null;

    /// <summary>
    /// Raises the calling thread's nice value by <paramref name="by"/> (0 to 19; the result is capped at 19, the lowest
    /// priority): relative, so a process started at another priority keeps its background below its own threads.
    /// Returns the nice value the thread has afterwards, or null where the OS has no per-thread nice value (then on
    /// Windows <see cref="Thread.Priority"/> is lowered instead).
    /// </summary>
    public static int? LowerCurrentThread(int by)
    {
        if (by is < 0 or > 19) throw new ArgumentOutOfRangeException(nameof(by), by, "a background priority drop is 0 (none) to 19 nice steps");
        if (OperatingSystem.IsLinux())
        {
            int tid = gettid();
            Marshal.SetLastPInvokeError(0);
            int current = getpriority(PrioProcess, tid); // -1 is a valid nice value: errno tells an error apart
            if (current == -1 && Marshal.GetLastPInvokeError() != 0) return null;
            int target = Math.Min(19, current + by);
            if (target == current) return current;
            return setpriority(PrioProcess, tid, target) == 0 ? target : current;
        }
        if (OperatingSystem.IsWindows() && by > 0)
            Thread.CurrentThread.Priority = by >= 10 ? ThreadPriority.Lowest : ThreadPriority.BelowNormal;
        return null;
    }
}
