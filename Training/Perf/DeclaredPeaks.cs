// The vendors' declared dense peaks of the GPUs a job is likely to meet, by the name the driver reports. Not measured.
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Training.Perf;

/// <summary>
/// Dense figures (no 2:4 sparsity, which the datasheets quote as the headline and which training does not use), per GPU,
/// in TFLOP/s, from NVIDIA's datasheets for the SXM/HGX part unless the name says otherwise. fp32 is the CUDA-core rate:
/// TorchSharp leaves TF32 matmuls off (PyTorch's default), so an fp32 run is measured against it; tf32 is listed for a
/// run that turns it on. bf16 and fp16 are tensor-core rates with fp32 accumulation. A MIG slice matches nothing: its
/// share of the chip is not the whole peak, so it is measured (and labelled measured) instead.
/// </summary>
public static class DeclaredPeaks
{
    /// <summary>One GPU model: the pattern its driver name matches and its dense peaks in TFLOP/s.</summary>
    public sealed record Entry(string Model, Regex Name, double Fp32, double Tf32, double Bf16, double Fp16)
    {
        public double? For(string precision) => precision switch
        {
            "fp32" => Fp32, "tf32" => Tf32, "bf16" => Bf16, "fp16" => Fp16,
            _ => null,
        };
    }

    static Entry E(string model, string pattern, double fp32, double tf32, double bf16, double fp16) =>
        new(model, new Regex(pattern, RegexOptions.IgnoreCase | RegexOptions.CultureInvariant), fp32, tf32, bf16, fp16);

    /// <summary>
    /// Most specific first: "GH200" and "GB200" before "H200" and "B200" (word boundaries keep them apart anyway), the
    /// PCIe and NVL variants before the SXM default of their family.
    /// </summary>
    public static IReadOnlyList<Entry> Table { get; } =
    [
        E("GB200", @"\bGB200\b", 80, 1250, 2500, 2500),
        E("B200", @"\bB200\b", 75, 1125, 2250, 2250),
        E("GH200", @"\bGH200\b", 67, 494.7, 989.4, 989.4),
        E("H200 NVL", @"\bH200\b.*\bNVL\b", 60, 417.5, 835.5, 835.5),
        E("H200 SXM", @"\bH200\b", 67, 494.7, 989.4, 989.4),
        E("H100 NVL", @"\bH100\b.*\bNVL\b", 60, 417.5, 835.5, 835.5),
        E("H100 PCIe", @"\bH100\b.*\bPCIe\b", 51, 378, 756, 756),
        E("H100 SXM", @"\bH100\b", 67, 494.7, 989.4, 989.4),   // "NVIDIA H100 80GB HBM3"
        E("H800 SXM", @"\bH800\b(?!.*\bPCIe\b)", 67, 494.7, 989.4, 989.4),
        E("A100", @"\bA100\b", 19.5, 156, 312, 312),          // SXM4 and PCIe alike; "NVIDIA A100-SXM4-80GB"
        E("A800", @"\bA800\b", 19.5, 156, 312, 312),
        E("L40S", @"\bL40S\b", 91.6, 183, 362.05, 362.05),
        E("L40", @"\bL40\b", 90.5, 90.5, 181, 181),
        E("L4", @"\bL4\b", 30.3, 60, 121, 121),
        E("A10", @"\bA10\b", 31.2, 62.5, 125, 125),
        E("RTX 4090", @"\bRTX 4090\b", 82.6, 82.6, 165.2, 165.2),
    ];

    /// <summary>The entry <paramref name="deviceName"/> (as the driver reports it) matches; null for an unknown GPU or a MIG slice.</summary>
    public static Entry? Find(string deviceName)
    {
        ArgumentNullException.ThrowIfNull(deviceName);
        if (deviceName.Contains("MIG", StringComparison.OrdinalIgnoreCase)) return null;
        return Table.FirstOrDefault(e => e.Name.IsMatch(deviceName));
    }

    /// <summary>The declared dense peak in FLOP/s of <paramref name="deviceName"/> at <paramref name="precision"/>; null when not known.</summary>
    public static double? Lookup(string deviceName, string precision) => Find(deviceName)?.For(precision) * 1e12;
}
