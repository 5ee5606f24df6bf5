// Lowers the CPU priority of the thread that calls it (nice, or Linux's SCHED_IDLE): checkpoint work that must not slow the training step it runs beside.
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
/// <para>
/// SCHED_IDLE (<see cref="IdleCurrentThread"/>) goes further than nice 19: the scheduler gives such a thread a weight of 3
/// against a normal thread's 1,024 (nice 19: 15), and it never preempts a normal thread on wakeup, so it runs where a core
/// would otherwise idle and takes almost nothing from threads that are running. It is a one-way door for a thread without
/// CAP_SYS_NICE (RLIMIT_NICE is 0 by default), which is one more reason it is only ever set on a thread made for one job.
/// </para>
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

    const int SchedIdle = 5; // SCHED_IDLE, linux/sched.h

    [LibraryImport("libc", SetLastError = true)]
    private static partial int sched_setscheduler(int pid, int policy, ref int param); // param: struct sched_param { int sched_priority; }

    /// <summary>
    /// Runs <paramref name="work"/> on a new thread <paramref name="nice"/> nice steps below the caller (and under SCHED_IDLE
    /// when <paramref name="idle"/>) and returns its result (or throws its exception) on the calling thread, which blocks
    /// meanwhile. <paramref name="work"/> must not queue anything to the thread pool (no awaits, no task completions with
    /// asynchronous continuations): see the class remarks. <paramref name="idleRefused"/> hears why the thread could not
    /// be made idle (it then runs at its nice value).
    /// </summary>
    public static T Run<T>(int nice, bool idle, string name, Func<T> work, Action<string>? idleRefused = null)
    {
        T result = default!;
        System.Runtime.ExceptionServices.ExceptionDispatchInfo? failure = null;
        var thread = new Thread(() =>
        {
            try
            {
                LowerCurrentThread(nice);
                if (idle && IdleCurrentThread() is { } refused) idleRefused?.Invoke(refused);
                result = work();
            }
            catch (Exception e) { failure = System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e); }
        }) { IsBackground = true, Name = name };
        thread.Start();
        thread.Join();
        failure?.Throw();
        return result;
    }

    /// <summary>
    /// Puts the calling thread under SCHED_IDLE (Linux; allowed without privileges for a thread lowering itself); returns
    /// null when it is, or why not: the errno (a seccomp filter or a container's policy can refuse it) or the OS.
    /// </summary>
    public static string? IdleCurrentThread()
    {
        if (!OperatingSystem.IsLinux()) return $"SCHED_IDLE is Linux's; {RuntimeInformation.OSDescription} runs the thread at its nice value";
        int priority = 0; // SCHED_IDLE takes no static priority
        if (sched_setscheduler(0, SchedIdle, ref priority) == 0) return null; // pid 0: the calling thread
        int errno = Marshal.GetLastPInvokeError();
        return $"sched_setscheduler(SCHED_IDLE) failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";
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
