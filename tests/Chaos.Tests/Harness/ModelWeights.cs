// The float32 tensors of a safetensors file (the Hugging Face folder rank 0 writes), read without TorchSharp, and the
// per-tensor comparison of two models.
using System.Buffers.Binary;
using System.Text.Json;

namespace DeepSeekCluster.Chaos;

public sealed class ModelWeights
{
    public IReadOnlyDictionary<string, float[]> Tensors { get; }
    ModelWeights(Dictionary<string, float[]> tensors) => Tensors = tensors;

    /// <summary>Reads every tensor of <paramref name="path"/>; only F32 is expected (the trainer keeps float32 weights).</summary>
    public static ModelWeights Read(string path)
    {
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 8) throw new InvalidDataException($"{path}: {bytes.Length} bytes, too short for a safetensors header");
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        if (headerLength <= 0 || 8 + headerLength > bytes.Length) throw new InvalidDataException($"{path}: header length {headerLength} does not fit the file");
        using var header = JsonDocument.Parse(bytes.AsMemory(8, (int)headerLength));
        var data = 8 + (int)headerLength;
        var tensors = new Dictionary<string, float[]>(StringComparer.Ordinal);
        foreach (var p in header.RootElement.EnumerateObject())
        {
            if (p.Name == "__metadata__") continue;
            var dtype = p.Value.GetProperty("dtype").GetString();
            if (dtype != "F32") throw new InvalidDataException($"{path}: tensor '{p.Name}' is {dtype}; expected F32");
            var offsets = p.Value.GetProperty("data_offsets");
            int begin = checked((int)offsets[0].GetInt64()), end = checked((int)offsets[1].GetInt64());
            var values = new float[(end - begin) / 4];
            Buffer.BlockCopy(bytes, data + begin, values, 0, end - begin);
            tensors[p.Name] = values;
        }
        return new ModelWeights(tensors);
    }

    /// <summary>Per tensor: the largest absolute difference and the reference's largest magnitude.</summary>
    public static ModelDiff Compare(ModelWeights reference, ModelWeights other)
    {
        var missing = reference.Tensors.Keys.Except(other.Tensors.Keys).Concat(other.Tensors.Keys.Except(reference.Tensors.Keys)).ToList();
        var rows = new List<TensorDiff>();
        foreach (var (name, a) in reference.Tensors)
        {
            if (!other.Tensors.TryGetValue(name, out var b)) continue;
            if (a.Length != b.Length) { missing.Add($"{name} (length {a.Length} vs {b.Length})"); continue; }
            double maxAbs = 0, scale = 0;
            bool bitwise = true;
            for (int i = 0; i < a.Length; i++)
            {
                maxAbs = Math.Max(maxAbs, Math.Abs((double)a[i] - b[i]));
                scale = Math.Max(scale, Math.Abs((double)a[i]));
                if (BitConverter.SingleToInt32Bits(a[i]) != BitConverter.SingleToInt32Bits(b[i])) bitwise = false;
            }
            rows.Add(new TensorDiff(name, maxAbs, scale, bitwise));
        }
        return new ModelDiff(rows, missing);
    }
}

public sealed record TensorDiff(string Name, double MaxAbsDiff, double ReferenceMaxAbs, bool Bitwise)
{
    public double Relative => MaxAbsDiff / Math.Max(ReferenceMaxAbs, 1e-12);
}

public sealed record ModelDiff(IReadOnlyList<TensorDiff> Tensors, IReadOnlyList<string> Mismatched)
{
    public bool Bitwise => Mismatched.Count == 0 && Tensors.All(t => t.Bitwise);
    public TensorDiff Worst => Tensors.MaxBy(t => t.Relative) ?? throw new InvalidOperationException("no tensor compared");

    /// <summary>The tensors whose max |a-b| exceeds <paramref name="relative"/> × the reference tensor's largest magnitude.</summary>
    public IReadOnlyList<TensorDiff> Beyond(double relative) => Tensors.Where(t => t.MaxAbsDiff > relative * t.ReferenceMaxAbs).ToList();

    public override string ToString() =>
        Mismatched.Count > 0 ? $"tensors present in only one model or of different shapes: {string.Join(", ", Mismatched)}"
        : $"{Tensors.Count} tensors, {(Bitwise ? "bitwise equal" : $"worst {Worst.Name}: max |diff| {Worst.MaxAbsDiff:E3} = {Worst.Relative:E3} of its largest magnitude {Worst.ReferenceMaxAbs:E3}")}";
}
