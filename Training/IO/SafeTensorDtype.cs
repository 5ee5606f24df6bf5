// The safetensors dtype names, their torch scalar types and sizes; not a general dtype registry.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>Maps between safetensors dtype strings ("F32", "BF16", ...) and <see cref="ScalarType"/>.</summary>
internal static class SafeTensorDtype
{
    // Rank is the place in the reference library's dtype enum, which is ordered by alignment; writers
    // lay tensors out by descending rank (then name) so every tensor starts at a multiple of its
    // element size once the header is padded to 8. Types the format has but torch lacks (U16, U32,
    // U64, F8_E5M2) are absent: we cannot make a tensor from them.
    private static readonly (string Name, ScalarType Type, int ItemSize, int Rank)[] Table =
    [
        ("BOOL", ScalarType.Bool, 1, 0),
        ("U8", ScalarType.Byte, 1, 1),
        // FP8 (e4m3fn), as DeepSeek-V3's released weights store them: read as raw bits (uint8), which Fp8BlockDequant
        // decodes with the tensor's weight_scale_inv. Never written: a uint8 tensor is written as U8 (found first).
        ("F8_E4M3", ScalarType.Byte, 1, 3),
        ("I8", ScalarType.Int8, 1, 2),
        ("I16", ScalarType.Int16, 2, 5),
        ("F16", ScalarType.Float16, 2, 7),
        ("BF16", ScalarType.BFloat16, 2, 8),
        ("I32", ScalarType.Int32, 4, 9),
        ("F32", ScalarType.Float32, 4, 11),
        ("F64", ScalarType.Float64, 8, 12),
        ("I64", ScalarType.Int64, 8, 13),
    ];

    /// <summary>The dtype names this reader accepts, for error messages.</summary>
    public static string KnownNames => string.Join(", ", Table.Select(e => e.Name));

    public static bool TryParse(string name, out ScalarType type, out int itemSize)
    {
        foreach (var e in Table)
        {
            if (e.Name == name)
            {
                (type, itemSize) = (e.Type, e.ItemSize);
                return true;
            }
        }
        (type, itemSize) = (default, 0);
        return false;
    }

    /// <summary>The safetensors name of a torch type; <see cref="ArgumentException"/> for types the format cannot hold.</summary>
    public static (string Name, int ItemSize, int Rank) Of(ScalarType type, string tensorName)
    {
        foreach (var e in Table)
        {
            if (e.Type == type) return (e.Name, e.ItemSize, e.Rank);
        }
        throw new ArgumentException(
            $"Tensor '{tensorName}' has dtype {type}, which safetensors cannot store; expected one of {KnownNames}.");
    }

    public static ScalarType ToScalarType(string name) =>
        TryParse(name, out var type, out _)
            ? type
            : throw new ArgumentException($"Unknown safetensors dtype '{name}'; expected one of {KnownNames}.");
}
