// A GGUF v3 file writer (the container llama.cpp loads): metadata, tensor directory, aligned tensor data. Knows no model.
using System.Text;

namespace DeepSeekCluster.Training.Export;

/// <summary>ggml tensor types this project writes (numbers from ggml.h).</summary>
public enum GgmlType : uint { F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8 }

/// <summary>
/// Collects metadata and tensors, then writes one GGUF file. Tensor data is produced on demand while
/// writing, so a large model is never held twice in memory; sizes are known up front from type and shape.
/// Shapes are in ggml order: ne[0] is the contiguous (innermost) dimension, the reverse of torch's.
/// </summary>
public sealed class GgufWriter
{
    const uint Magic = 0x46554747; // "GGUF" read as a little-endian uint32
    const uint Version = 3;
    public const int Alignment = 32;

    enum ValueType : uint { UInt32 = 4, Int32 = 5, Float32 = 6, Bool = 7, String = 8, Array = 9 }

    sealed record Entry(string Key, ValueType Type, object Value, ValueType ElementType = default);
    sealed record TensorEntry(string Name, ulong[] Ne, GgmlType Type, Func<float[]> Data);

    readonly List<Entry> _metadata = [];
    readonly List<TensorEntry> _tensors = [];
    readonly HashSet<string> _keys = new(StringComparer.Ordinal);

    public IReadOnlyCollection<string> TensorNames => _tensors.Select(t => t.Name).ToList();

    public void Add(string key, uint value) => Put(new(key, ValueType.UInt32, value));
    public void Add(string key, float value) => Put(new(key, ValueType.Float32, value));
    public void Add(string key, bool value) => Put(new(key, ValueType.Bool, value));
    public void Add(string key, string value) => Put(new(key, ValueType.String, value));
    public void Add(string key, IReadOnlyList<string> values) => Put(new(key, ValueType.Array, values, ValueType.String));
    public void Add(string key, IReadOnlyList<int> values) => Put(new(key, ValueType.Array, values, ValueType.Int32));

    void Put(Entry e)
    {
        if (!_keys.Add(e.Key)) throw new InvalidOperationException($"GGUF metadata key '{e.Key}' was added twice");
        _metadata.Add(e);
    }

    /// <summary>Adds a tensor whose float32 values (row-major, ne[0] fastest) <paramref name="data"/> returns when written.</summary>
    public void AddTensor(string name, ulong[] ne, GgmlType type, Func<float[]> data)
    {
        if (_tensors.Any(t => t.Name == name)) throw new InvalidOperationException($"GGUF tensor '{name}' was added twice");
        if (type is GgmlType.Q4_0 or GgmlType.Q8_0 && ne[0] % GgmlQuant.BlockSize != 0)
            throw new ArgumentException($"tensor '{name}': {type} needs rows of a multiple of {GgmlQuant.BlockSize} values, got {ne[0]}");
        _tensors.Add(new(name, ne, type, data));
    }

    /// <summary>Writes the file through a temporary name beside it, so a failed write leaves no partial .gguf.</summary>
    public void Write(string path)
    {
        var tmp = path + ".partial";
        try
        {
            using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            using (var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
            {
                w.Write(Magic);
                w.Write(Version);
                w.Write((ulong)_tensors.Count);
                w.Write((ulong)_metadata.Count);
                foreach (var e in _metadata) WriteEntry(w, e);

                ulong offset = 0;
                foreach (var t in _tensors)
                {
                    WriteString(w, t.Name);
                    w.Write((uint)t.Ne.Length);
                    foreach (var n in t.Ne) w.Write(n);
                    w.Write((uint)t.Type);
                    w.Write(offset);
                    offset = Align(offset + GgmlQuant.ByteSize(t.Type, Elements(t.Ne)));
                }
                Pad(w);
                foreach (var t in _tensors)
                {
                    var values = t.Data();
                    if ((ulong)values.LongLength != Elements(t.Ne))
                        throw new InvalidOperationException($"tensor '{t.Name}': expected {Elements(t.Ne)} values, the source gave {values.LongLength}");
                    w.Write(GgmlQuant.Encode(t.Type, values));
                    Pad(w);
                }
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch
        {
            File.Delete(tmp);
            throw;
        }
    }

    static ulong Elements(ulong[] ne) => ne.Aggregate(1UL, (a, b) => a * b);
    static ulong Align(ulong n) => (n + Alignment - 1) / Alignment * Alignment;

    static void Pad(BinaryWriter w)
    {
        long pos = w.BaseStream.Position;
        long pad = (long)Align((ulong)pos) - pos;
        for (long i = 0; i < pad; i++) w.Write((byte)0);
    }

    static void WriteString(BinaryWriter w, string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)bytes.Length);
        w.Write(bytes);
    }

    static void WriteEntry(BinaryWriter w, Entry e)
    {
        WriteString(w, e.Key);
        w.Write((uint)e.Type);
        switch (e.Type)
        {
            case ValueType.UInt32: w.Write((uint)e.Value); break;
            case ValueType.Float32: w.Write((float)e.Value); break;
            case ValueType.Bool: w.Write((bool)e.Value ? (byte)1 : (byte)0); break;
            case ValueType.String: WriteString(w, (string)e.Value); break;
            case ValueType.Array when e.ElementType == ValueType.String:
                var strings = (IReadOnlyList<string>)e.Value;
                w.Write((uint)ValueType.String);
                w.Write((ulong)strings.Count);
                foreach (var s in strings) WriteString(w, s);
                break;
            case ValueType.Array when e.ElementType == ValueType.Int32:
                var ints = (IReadOnlyList<int>)e.Value;
                w.Write((uint)ValueType.Int32);
                w.Write((ulong)ints.Count);
                foreach (var i in ints) w.Write(i);
                break;
            default: throw new InvalidOperationException($"GGUF value type {e.Type} of '{e.Key}' has no writer");
        }
    }
}
