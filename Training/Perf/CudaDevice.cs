// A CUDA device's name and UUID from the driver (libcuda.so.1): TorchSharp 0.107 exposes neither. Not a device manager.
using System.Runtime.InteropServices;
using System.Text;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Perf;

public static class CudaDevice
{
    const string Driver = "libcuda.so.1"; // as AppHost/LocalGpus.cs: the driver answers, CUDA_VISIBLE_DEVICES already applied

    [DllImport(Driver)] static extern int cuInit(uint flags);
    [DllImport(Driver)] static extern int cuDeviceGet(out int device, int ordinal);
    [DllImport(Driver)] static extern int cuDeviceGetName(byte[] name, int length, int device);
    [DllImport(Driver)] static extern int cuDeviceGetUuid(byte[] uuid, int device);
    [DllImport(Driver)] static extern int cuDeviceTotalMem_v2(out nuint bytes, int device);

    /// <summary>The device's total memory in bytes; null without a driver or when it refuses.</summary>
    public static long? TotalMemory(Device device)
    {
        nuint bytes = 0;
        return Call(device, d => cuDeviceTotalMem_v2(out bytes, d)) is true ? (long)bytes : null;
    }

    /// <summary>"NVIDIA H100 80GB HBM3": the name nvidia-smi shows; null without a driver or when it refuses.</summary>
    public static string? Name(Device device)
    {
        var buffer = new byte[256];
        if (Call(device, d => cuDeviceGetName(buffer, buffer.Length, d)) is not true) return null;
        int end = Array.IndexOf(buffer, (byte)0);
        return Encoding.ASCII.GetString(buffer, 0, end < 0 ? buffer.Length : end).Trim();
    }

    /// <summary>"cuda:GPU-8c1f…": the physical GPU, the same whichever ordinal CUDA_VISIBLE_DEVICES gives it in a process.</summary>
    public static string Identity(Device device)
    {
        var uuid = new byte[16];
        if (Call(device, d => cuDeviceGetUuid(uuid, d)) is not true) return $"cuda:{Environment.MachineName}:{Math.Max(0, (int)device.index)}";
        var hex = Convert.ToHexStringLower(uuid);
        return $"cuda:GPU-{hex[..8]}-{hex[8..12]}-{hex[12..16]}-{hex[16..20]}-{hex[20..]}";
    }

    /// <summary>The driver call on <paramref name="device"/>'s ordinal; null when there is no driver.</summary>
    static bool? Call(Device device, Func<int, int> call)
    {
        try
        {
            return cuInit(0) == 0 && cuDeviceGet(out int d, Math.Max(0, (int)device.index)) == 0 && call(d) == 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return null; }
    }
}
