// P/Invoke declarations for libnccl.so.2 (NCCL 2.x C API) and the few CUDA driver calls NCCL needs around it.
using System.Reflection;
using System.Runtime.InteropServices;

namespace DeepSeekCluster.Training.Collectives.Nccl;

internal static unsafe class NcclNative
{
    public const string Library = "libnccl.so.2";
    public const int UniqueIdBytes = 128;

    /// <summary>NCCL 2.10.0 (ncclGetVersion's code): the first with ncclAvg and ncclBfloat16, which this backend uses.</summary>
    public const int MinimumVersion = 21000;

    /// <summary>Entry points used when present and never required (ncclGetLastError came in NCCL 2.13).</summary>
    public static readonly IReadOnlySet<string> OptionalEntryPoints = new HashSet<string> { nameof(ncclGetLastError) };

    /// <summary>Every libnccl function declared here, by its exported name.</summary>
    public static IEnumerable<string> EntryPoints =>
        typeof(NcclNative).GetMethods(BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic)
            .Where(m => m.GetCustomAttribute<DllImportAttribute>()?.Value == Library)
            .Select(m => m.GetCustomAttribute<DllImportAttribute>()!.EntryPoint ?? m.Name);

    /// <summary>NCCL_VERSION_CODE as text: major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before.</summary>
    public static string VersionText(int code) =>
        code >= 20900 ? $"{code / 10000}.{code / 100 % 100}.{code % 100}" : $"{code / 1000}.{code / 100 % 10}.{code % 100}";

    // ncclResult_t
    public const int Success = 0, InProgress = 7;

    // ncclDataType_t
    public const int Int64 = 4, Float16 = 6, Float32 = 7, Float64 = 8, BFloat16 = 9;
    // ncclRedOp_t
    public const int Sum = 0, Max = 2, Avg = 4;

    [StructLayout(LayoutKind.Sequential)]
    public struct UniqueId { public fixed byte Internal[UniqueIdBytes]; }

    [DllImport(Library)] public static extern int ncclGetVersion(out int version);
    [DllImport(Library)] public static extern int ncclGetUniqueId(out UniqueId id);
    [DllImport(Library)] public static extern int ncclCommInitRank(out IntPtr comm, int nranks, UniqueId id, int rank);
    [DllImport(Library)] public static extern int ncclCommDestroy(IntPtr comm);
    [DllImport(Library)] public static extern int ncclCommAbort(IntPtr comm);
    [DllImport(Library)] public static extern int ncclCommGetAsyncError(IntPtr comm, out int asyncError);
    [DllImport(Library)] public static extern IntPtr ncclGetErrorString(int result);
    [DllImport(Library)] public static extern IntPtr ncclGetLastError(IntPtr comm);
    [DllImport(Library)] public static extern int ncclAllReduce(IntPtr sendbuff, IntPtr recvbuff, nuint count, int datatype, int op, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclReduceScatter(IntPtr sendbuff, IntPtr recvbuff, nuint recvcount, int datatype, int op, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclAllGather(IntPtr sendbuff, IntPtr recvbuff, nuint sendcount, int datatype, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclBroadcast(IntPtr sendbuff, IntPtr recvbuff, nuint count, int datatype, int root, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclSend(IntPtr sendbuff, nuint count, int datatype, int peer, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclRecv(IntPtr recvbuff, nuint count, int datatype, int peer, IntPtr comm, IntPtr stream);
    [DllImport(Library)] public static extern int ncclGroupStart();
    [DllImport(Library)] public static extern int ncclGroupEnd();

    /// <summary>
    /// NCCL's name for <paramref name="result"/>, followed by its last error message where it keeps one (the generic
    /// "unhandled cuda error" says little; the last error says which CUDA call failed and why).
    /// </summary>
    public static string ErrorString(int result, IntPtr comm = default)
    {
        string text;
        try { text = Marshal.PtrToStringAnsi(ncclGetErrorString(result)) ?? $"NCCL error {result}"; }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return $"NCCL error {result}"; }
        try
        {
            var last = Marshal.PtrToStringAnsi(ncclGetLastError(comm));
            return string.IsNullOrWhiteSpace(last) ? text : $"{text}: {last.Trim()}";
        }
        catch (EntryPointNotFoundException) { return text; }
    }

    // The CUDA driver API (libcuda.so.1 ships with the driver, one per process): NCCL uses the calling thread's current
    // device, and TorchSharp has no set_device, so we make the device's primary context current as cudaSetDevice would.
    const string Driver = "libcuda.so.1";
    [DllImport(Driver)] static extern int cuInit(uint flags);
    [DllImport(Driver)] static extern int cuDeviceGet(out int device, int ordinal);
    [DllImport(Driver)] static extern int cuDevicePrimaryCtxRetain(out IntPtr context, int device);
    [DllImport(Driver)] static extern int cuCtxSetCurrent(IntPtr context);

    // Streams and events for the overlapped all-reduce (NcclCollective.SideStream.cs). Stream 0 is the legacy default
    // stream, TorchSharp's; a NON_BLOCKING stream does not synchronize with it implicitly, so only the events order them.
    public const uint StreamNonBlocking = 1, EventDisableTiming = 2;
    [DllImport(Driver)] public static extern int cuStreamCreate(out IntPtr stream, uint flags);
    [DllImport(Driver, EntryPoint = "cuStreamDestroy_v2")] public static extern int cuStreamDestroy(IntPtr stream);
    [DllImport(Driver)] public static extern int cuEventCreate(out IntPtr evt, uint flags);
    [DllImport(Driver, EntryPoint = "cuEventDestroy_v2")] public static extern int cuEventDestroy(IntPtr evt);
    [DllImport(Driver)] public static extern int cuEventRecord(IntPtr evt, IntPtr stream);
    [DllImport(Driver)] public static extern int cuStreamWaitEvent(IntPtr stream, IntPtr evt, uint flags);
    [DllImport(Driver)] public static extern int cuEventSynchronize(IntPtr evt);

    public static void MakeDeviceCurrent(int ordinal)
    {
        int r = cuInit(0);
        int device = 0;
        IntPtr context = IntPtr.Zero;
        if (r == 0) r = cuDeviceGet(out device, ordinal);
        if (r == 0) r = cuDevicePrimaryCtxRetain(out context, device);
        if (r == 0) r = cuCtxSetCurrent(context);
        if (r != 0) throw new CollectiveException(CollectiveFailure.Unavailable, $"cannot make CUDA device {ordinal} current (CUDA driver error {r})");
    }
}
