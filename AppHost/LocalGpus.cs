// The CUDA devices this machine gives its workers. NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so the
// AppHost gives every worker a GPU of its own through CUDA_VISIBLE_DEVICES, as torchrun does with LOCAL_RANK and as a
// Kubernetes pod gets one with nvidia.com/gpu: 1. The driver (libcuda.so.1) answers; the AppHost loads no libtorch.
using System.Runtime.InteropServices;

namespace DeepSeekCluster.AppHost;

public static class LocalGpus
{
    [DllImport("libcuda.so.1")] static extern int cuInit(uint flags);
    [DllImport("libcuda.so.1")] static extern int cuDeviceGetCount(out int count);

    /// <summary>The CUDA_VISIBLE_DEVICES values workers may be given: none without a driver or a device.</summary>
    public static IReadOnlyList<string> Visible() => Visible(Environment.GetEnvironmentVariable("CUDA_VISIBLE_DEVICES"), DriverCount());

    /// <summary>
    /// The ids of the <paramref name="driverCount"/> devices the driver reports: the entries of this process's own
    /// CUDA_VISIBLE_DEVICES where it is set (indices or GPU-… UUIDs, which the driver has already applied), else 0…n-1.
    /// </summary>
    public static IReadOnlyList<string> Visible(string? cudaVisibleDevices, int driverCount)
    {
        if (driverCount <= 0) return [];
        if (cudaVisibleDevices is null) return Enumerable.Range(0, driverCount).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        return cudaVisibleDevices.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).Take(driverCount).ToArray();
    }

    static int DriverCount()
    {
        try { return cuInit(0) == 0 && cuDeviceGetCount(out int n) == 0 ? n : 0; }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { return 0; }
    }
}

/// <summary>Hands each worker instance a GPU of its own when it starts and takes it back when the instance exits.</summary>
public sealed class GpuSlots(IReadOnlyList<string> devices)
{
    readonly Dictionary<string, string> held = new(StringComparer.Ordinal);
    readonly Lock gate = new();

    /// <summary>The device for <paramref name="instance"/>: the first no other instance holds.</summary>
    /// <exception cref="InvalidOperationException">Every device has a worker.</exception>
    public string Take(string instance)
    {
        lock (gate)
        {
            if (held.TryGetValue(instance, out var mine)) return mine;
            var free = devices.FirstOrDefault(d => !held.ContainsValue(d))
                ?? throw new InvalidOperationException(
                    $"no GPU is free for {instance}: all {devices.Count} ({string.Join(", ", devices)}) have a worker, and NCCL runs one rank per GPU");
            held[instance] = free;
            return free;
        }
    }

    public void Release(string instance)
    {
        lock (gate) held.Remove(instance);
    }
}
