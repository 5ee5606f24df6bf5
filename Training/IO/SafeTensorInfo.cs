// One tensor's entry in a safetensors header: what it is and where its bytes lie.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>
/// A header entry. <see cref="Begin"/> and <see cref="End"/> are byte offsets relative to the start
/// of the data section (the byte after the header), as in the file.
/// </summary>
public sealed record SafeTensorInfo(string Name, string Dtype, long[] Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;

    public ScalarType ScalarType => SafeTensorDtype.ToScalarType(Dtype);
}
