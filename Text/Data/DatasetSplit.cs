// Which side of a prepared dataset's train/validation split a document falls on: the data service's rule, kept here
// so that what must agree with it (the evaluation tasks made from held-out chapters) needs no service. Not a sampler.
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace DeepSeekCluster.Text.Data;

public static class DatasetSplit
{
    const ulong SplitSeed = 0x5350_4C49_5456_414C; // which side of the split a document falls on

    /// <summary>The cleaned document's identity: the first 128 bits of the SHA-256 of its UTF-8 bytes (dedup uses it too).</summary>
    public static UInt128 TextHash(string text) => BinaryPrimitives.ReadUInt128LittleEndian(SHA256.HashData(Encoding.UTF8.GetBytes(text)));

    /// <summary>True when the document with this hash is held out for validation at <paramref name="fraction"/>.</summary>
    public static bool IsValidation(UInt128 hash, double fraction) =>
        StableHash.ToUnitInterval(StableHash.Combine(SplitSeed, (ulong)hash)) < fraction;
}
