// Tests for the safetensors reader/writer: round trips, the exact byte layout, row reads, corrupt files, failed saves.
using System.Text;
using DeepSeekCluster.Training.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests;

public sealed class SafeTensorsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("safetensors-tests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    // ---- Round trips ----

    public static TheoryData<ScalarType> AllDtypes =>
    [
        ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16, ScalarType.Float64, ScalarType.Int64,
        ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool,
    ];

    [Theory]
    [MemberData(nameof(AllDtypes))]
    public void EveryDtypeRoundTripsBitForBitIncludingScalarsAndEmptyTensors(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var random = new Random(1234);
        var shapes = new Dictionary<string, long[]>
        {
            ["matrix"] = [3, 5],
            ["scalar"] = [],
            ["empty"] = [0, 4],
            ["cube"] = [2, 3, 4],
        };
        var originals = shapes.ToDictionary(kv => kv.Key, kv => RandomBits(kv.Value, dtype, random));

        SafeTensors.Save(PathOf("all.safetensors"), originals);

        using var file = SafeTensors.Open(PathOf("all.safetensors"));
        Assert.Equal(shapes.Keys.Order(), file.Tensors.Select(t => t.Name).Order());
        foreach (var (name, original) in originals)
        {
            var loaded = file.Read(name);
            Assert.Equal(dtype, loaded.dtype);
            Assert.Equal(original.shape, loaded.shape);
            Assert.Equal(BytesOf(original), BytesOf(loaded));
        }
    }

    [Fact]
    public void NonContiguousTensorsAreSavedAsTheirLogicalValues()
    {
        using var scope = NewDisposeScope();
        var t = arange(12, dtype: ScalarType.Float32).reshape(3, 4).t(); // (4, 3), strides (1, 4)
        Assert.False(t.is_contiguous());

        SafeTensors.Save(PathOf("t.safetensors"), [new("t", t)]);

        using var file = SafeTensors.Open(PathOf("t.safetensors"));
        var loaded = file.Read("t");
        Assert.Equal(new long[] { 4, 3 }, loaded.shape);
        Assert.Equal(t.contiguous().data<float>().ToArray(), loaded.data<float>().ToArray());
    }

    [Fact]
    public void ATensorLargerThanOneCopyChunkRoundTrips()
    {
        // 68 MB: over the 64 MiB chunk that Tensor.bytes is read and written through.
        using var scope = NewDisposeScope();
        var big = arange(17_000_000, dtype: ScalarType.Int32).reshape(1_000_000, 17);
        SafeTensors.Save(PathOf("big.safetensors"), [new("big", big)]);

        using var file = SafeTensors.Open(PathOf("big.safetensors"));
        var read = file.Read("big");
        Assert.Equal(big.shape, read.shape);
        Assert.True(read.eq(big).all().item<bool>());
        var rows = file.ReadRows("big", 3, 999_990);
        Assert.Equal(new long[] { 999_990, 17 }, rows.shape);
        Assert.True(rows.eq(big.narrow(0, 3, 999_990)).all().item<bool>());
    }

    [Fact]
    public void MetadataRoundTrips()
    {
        using var scope = NewDisposeScope();
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["step"] = "42", ["note"] = "é \"quoted\"" };
        SafeTensors.Save(PathOf("m.safetensors"), [new("x", ones(2))], metadata);

        using var file = SafeTensors.Open(PathOf("m.safetensors"));
        Assert.Equal(metadata.OrderBy(kv => kv.Key), file.Metadata.OrderBy(kv => kv.Key));
    }

    // ---- The format, pinned independently of our reader ----

    [Fact]
    public void ASmallFileHasExactlyTheHandComputedBytes()
    {
        using var scope = NewDisposeScope();
        var tensors = new Dictionary<string, Tensor>
        {
            ["a"] = tensor(new float[] { 1f }).to(ScalarType.Float16),
            ["b"] = tensor(new int[] { 1, -2 }),
        };
        SafeTensors.Save(PathOf("small.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });

        // 139 bytes of JSON padded with 5 spaces to 144 = 0x90. "b" (I32) precedes "a" (F16): larger
        // alignment first, as the reference library orders them, so each tensor starts aligned.
        const string json = """{"__metadata__":{"format":"pt"},"b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}}""";
        byte[] expected =
        [
            0x90, 0, 0, 0, 0, 0, 0, 0,
            .. Encoding.ASCII.GetBytes(json + "     "),
            0x01, 0x00, 0x00, 0x00, 0xFE, 0xFF, 0xFF, 0xFF, // I32 1, -2
            0x00, 0x3C,                                     // F16 1.0
        ];
        Assert.Equal(144, json.Length + 5);
        Assert.Equal(expected, File.ReadAllBytes(PathOf("small.safetensors")));
    }

    [Fact]
    public void AGoldenFileWrittenByNumpyReadsBackAndRewritesByteForByte()
    {
        using var scope = NewDisposeScope();
        string golden = GoldenPath("numpy_golden.safetensors");

        using var file = SafeTensors.Open(golden);
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal("numpy", file.Metadata["source"]);
        Assert.Equal(new float[] { -1f, -0.5f, 0f, 0.5f, 1f, 1.5f }, file.Read("embed.weight").data<float>().ToArray());
        Assert.Equal(new long[] { 2, 3 }, file.Read("embed.weight").shape);
        Assert.Equal(new double[] { 3.141592653589793, -2.5e-300 }, file.Read("double").data<double>().ToArray());
        Assert.Empty(file.Read("steps").shape);
        Assert.Equal(1234567890123L, file.Read("steps").item<long>());
        Assert.Equal(new int[] { -1, 0, int.MaxValue }, file.Read("ids").data<int>().ToArray());
        Assert.Equal(new short[] { short.MinValue, 123 }, file.Read("short").data<short>().ToArray());
        Assert.Equal(new sbyte[] { -128, 0, 127 }, file.Read("tiny").data<sbyte>().ToArray());
        Assert.Equal(new byte[] { 0, 1, 128, 255 }, file.Read("bytes").data<byte>().ToArray());
        Assert.Equal(new bool[] { true, false, false, true }, file.Read("mask").data<bool>().ToArray());
        Assert.Equal(new float[] { 1f, -2f, 65504f }, file.Read("half").to(ScalarType.Float32).data<float>().ToArray());
        Assert.Equal(new float[] { 1f, -1.5f, 0.15625f, 256f }, file.Read("brain").to(ScalarType.Float32).data<float>().ToArray());
        Assert.Equal(new long[] { 0, 3 }, file.Read("empty").shape);

        var all = file.Tensors.Select(t => new KeyValuePair<string, Tensor>(t.Name, file.Read(t.Name))).ToList();
        SafeTensors.Save(PathOf("rewritten.safetensors"), all, file.Metadata);
        Assert.Equal(File.ReadAllBytes(golden), File.ReadAllBytes(PathOf("rewritten.safetensors")));
    }

    // ---- Row reads ----

    [Theory]
    [InlineData(0, 7)]
    [InlineData(2, 3)]
    [InlineData(6, 1)]
    [InlineData(7, 0)]
    public void ReadRowsEqualsTheSliceOfTheFullTensor(long start, long count)
    {
        using var scope = NewDisposeScope();
        var random = new Random(7);
        var f32 = RandomBits([7, 3, 2], ScalarType.Float32, random);
        var bf16 = RandomBits([7, 5], ScalarType.BFloat16, random);
        SafeTensors.Save(PathOf("rows.safetensors"), [new("f32", f32), new("bf16", bf16)]);

        using var file = SafeTensors.Open(PathOf("rows.safetensors"));
        foreach (var (name, full) in new[] { ("f32", f32), ("bf16", bf16) })
        {
            var rows = file.ReadRows(name, start, count);
            var expected = full.narrow(0, start, count);
            Assert.Equal(expected.shape, rows.shape);
            Assert.Equal(BytesOf(expected), BytesOf(rows));
        }
    }

    [Fact]
    public void ReadRowsOutsideTheTensorIsRejected()
    {
        using var scope = NewDisposeScope();
        SafeTensors.Save(PathOf("rows.safetensors"), [new("x", zeros(4, 2)), new("s", tensor(3f))]);

        using var file = SafeTensors.Open(PathOf("rows.safetensors"));
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => file.ReadRows("x", 3, 2));
        Assert.Contains("'x'", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => file.ReadRows("x", -1, 1));
        Assert.Throws<ArgumentException>(() => file.ReadRows("s", 0, 1));
    }

    [Fact]
    public void NarrowedViewBytesStartAtTheViewNotAtTheStorage()
    {
        // TensorBytes chunks big tensors through narrow(); that relies on .bytes honouring the view's offset.
        using var scope = NewDisposeScope();
        var t = arange(10, dtype: ScalarType.Int32);
        var part = t.narrow(0, 3, 4);
        Assert.Equal(BytesOf(tensor(new int[] { 3, 4, 5, 6 })), part.bytes.ToArray());
        part.bytes.Fill(0);
        Assert.Equal(new int[] { 0, 1, 2, 0, 0, 0, 0, 7, 8, 9 }, t.data<int>().ToArray());
    }

    // ---- Corrupt files ----

    public static TheoryData<string, string, int, string> CorruptHeaders => new()
    {
        { "invalid JSON", """{"x":{"dtype":"F32",""", 4, "not valid UTF-8 JSON" },
        { "JSON that is not an object", """[1,2]""", 0, "expected an object" },
        { "unknown dtype", """{"x":{"dtype":"F8_E5M2","shape":[4],"data_offsets":[0,4]}}""", 4, "unknown dtype 'F8_E5M2'" },
        { "size mismatch", """{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}""", 12, "which is 16 bytes, but its data_offsets [0, 12] span 12" },
        { "overlap", """{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 12, "overlaps tensor 'x'" },
        { "gap", """{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "begins at data offset 4; expected 0" },
        { "offsets past the data", """{"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}""", 8, "the data section is only 8 bytes" },
        { "offsets reversed", """{"x":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}""", 8, "end before they begin" },
        { "negative dimension", """{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", 4, "expected a non-negative integer" },
        { "trailing bytes", """{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}""", 5, "the tensors cover 2" },
        { "non-string metadata", """{"__metadata__":{"step":3}}""", 0, "metadata 'step'" },
    };

    [Theory]
    [MemberData(nameof(CorruptHeaders))]
    public void ACorruptHeaderIsRejectedNamingTheFileAndWhatWasExpected(string why, string header, int dataBytes, string expected)
    {
        string path = PathOf($"{why.Replace(' ', '-')}.safetensors");
        WriteRaw(path, header, new byte[dataBytes]);

        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void AFileShorterThanEightBytesIsRejected()
    {
        string path = PathOf("short.safetensors");
        File.WriteAllBytes(path, [1, 2, 3]);

        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Contains("3 bytes", e.Message);
    }

    [Fact]
    public void AHeaderLengthLargerThanTheFileIsRejected()
    {
        string path = PathOf("long-header.safetensors");
        File.WriteAllBytes(path, [.. BitConverter.GetBytes(1000UL), .. "{}      "u8]);

        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Contains("header length is 1000 bytes but only 8 bytes follow", e.Message);
    }

    [Fact]
    public void ATruncatedFileIsRejected()
    {
        using var scope = NewDisposeScope();
        string path = PathOf("truncated.safetensors");
        SafeTensors.Save(path, [new("a", ones(4)), new("b", ones(3, 3))]);
        using (var f = new FileStream(path, FileMode.Open)) f.SetLength(f.Length - 5);

        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void AMissingTensorNameThrowsKeyNotFoundNamingTheTensorAndFile()
    {
        using var scope = NewDisposeScope();
        string path = PathOf("one.safetensors");
        SafeTensors.Save(path, [new("present", ones(1))]);

        using var file = SafeTensors.Open(path);
        Assert.True(file.Contains("present"));
        Assert.False(file.Contains("absent"));
        var e = Assert.Throws<KeyNotFoundException>(() => file.Read("absent"));
        Assert.Contains("'absent'", e.Message);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void AnEmptyHeaderIsAValidFileWithNoTensors()
    {
        string path = PathOf("empty.safetensors");
        WriteRaw(path, "{}", []);

        using var file = SafeTensors.Open(path);
        Assert.Empty(file.Tensors);
        Assert.Empty(file.Metadata);
    }

    // ---- Failed saves ----

    [Fact]
    public void ASaveThatFailsWhileCollectingTensorsLeavesTheExistingFileIntact()
    {
        using var scope = NewDisposeScope();
        string path = PathOf("model.safetensors");
        SafeTensors.Save(path, [new("w", ones(8))]);
        byte[] before = File.ReadAllBytes(path);

        IEnumerable<KeyValuePair<string, Tensor>> Failing()
        {
            yield return new("w", zeros(8));
            throw new IOException("producer failed");
        }

        Assert.Throws<IOException>(() => SafeTensors.Save(path, Failing()));
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Equal([path], Directory.GetFiles(_dir)); // no temporary file left behind
    }

    [Fact]
    public void ASaveThatFailsWhileWritingDataLeavesTheExistingFileIntact()
    {
        using var scope = NewDisposeScope();
        string path = PathOf("model.safetensors");
        SafeTensors.Save(path, [new("w", ones(8))]);
        byte[] before = File.ReadAllBytes(path);

        // A meta tensor has a shape and dtype (so the header is written) but no data to copy.
        var good = zeros(1000);
        var noData = empty([16], ScalarType.Float32, device: new Device(DeviceType.META));

        // "a" is written first (same dtype, name order); the copy of "b" to the CPU then fails.
        var e = Assert.Throws<System.Runtime.InteropServices.ExternalException>(
            () => SafeTensors.Save(path, [new("a", good), new("b", noData)]));
        Assert.Contains("meta", e.Message);
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Equal([path], Directory.GetFiles(_dir));
    }

    [Fact]
    public void DtypesTheFormatCannotHoldAreRejectedByName()
    {
        using var scope = NewDisposeScope();
        var complex = zeros(2, dtype: ScalarType.ComplexFloat32);
        var e = Assert.Throws<ArgumentException>(() => SafeTensors.Save(PathOf("c.safetensors"), [new("z", complex)]));
        Assert.Contains("'z'", e.Message);
        Assert.Empty(Directory.GetFiles(_dir));
    }

    // ---- Helpers ----

    /// <summary>A tensor of the given shape filled with random bit patterns (0/1 for bool, any bits otherwise, NaNs included).</summary>
    internal static Tensor RandomBits(long[] shape, ScalarType dtype, Random random)
    {
        var t = empty(shape, dtype);
        if (t.numel() == 0) return t;
        var bytes = new byte[t.numel() * t.ElementSize];
        random.NextBytes(bytes);
        if (dtype == ScalarType.Bool)
        {
            for (int i = 0; i < bytes.Length; i++) bytes[i] &= 1;
        }
        t.bytes = bytes;
        return t;
    }

    internal static byte[] BytesOf(Tensor t) => t.numel() == 0 ? [] : t.contiguous().bytes.ToArray();

    /// <summary>Writes a file by hand: length prefix, header padded to 8 with spaces, data.</summary>
    private static void WriteRaw(string path, string header, byte[] data)
    {
        byte[] json = Encoding.UTF8.GetBytes(header);
        int padded = (json.Length + 7) / 8 * 8;
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes((ulong)padded));
        f.Write(json);
        for (int i = json.Length; i < padded; i++) f.WriteByte((byte)' ');
        f.Write(data);
    }

    /// <summary>Goldens live beside the test sources; walk up from the output folder to find them.</summary>
    internal static string GoldenPath(string name)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            foreach (string candidate in new[]
            {
                Path.Combine(dir.FullName, "Goldens", name),
                Path.Combine(dir.FullName, "tests", "Training.Tests", "Goldens", name),
            })
            {
                if (File.Exists(candidate)) return candidate;
            }
        }
        throw new FileNotFoundException($"Golden file {name} not found above {AppContext.BaseDirectory}; it lives in tests/Training.Tests/Goldens.");
    }
}
