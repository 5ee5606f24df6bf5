// Which file a native library was loaded from: "which libnccl.so.2 (or libcuda.so.1) did the loader pick" is the first
// question when a GPU job fails to start.
using System.Runtime.InteropServices;

namespace DeepSeekCluster.Training.Collectives.Nccl;

public static class SharedLibrary
{
    [StructLayout(LayoutKind.Sequential)]
    struct DlInfo { public IntPtr FileName, FileBase, SymbolName, SymbolAddress; }

    [DllImport("libc", EntryPoint = "dladdr")] static extern int dladdr(IntPtr address, out DlInfo info);

    /// <summary>The path of the file that <paramref name="library"/>'s <paramref name="export"/> lives in, or null where the loader cannot say.</summary>
    public static string? PathOf(IntPtr library, string export)
    {
        if (!NativeLibrary.TryGetExport(library, export, out var address)) return null;
        try { return dladdr(address, out var info) != 0 && info.FileName != IntPtr.Zero ? Marshal.PtrToStringAnsi(info.FileName) : null; }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return null; }
    }

    /// <summary>
    /// The files this process has mapped, by file name (e.g. libtorch_cuda.so → its path), read once from /proc/self/maps;
    /// empty where there is none. Tells which of several copies the loader picked (the app folder's, LD_LIBRARY_PATH's, a
    /// Python wheel's).
    /// </summary>
    public static IReadOnlyDictionary<string, string> LoadedFiles()
    {
        var files = new Dictionary<string, string>(StringComparer.Ordinal);
        if (!File.Exists("/proc/self/maps")) return files;
        foreach (var line in File.ReadLines("/proc/self/maps"))
        {
            int slash = line.IndexOf('/');
            if (slash >= 0) files.TryAdd(Path.GetFileName(line[slash..]), line[slash..]);
        }
        return files;
    }
}
