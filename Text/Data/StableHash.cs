// Seeded 64-bit mixing and text hashing that give the same bits in every process, on every
// .NET version and machine; not a cryptographic hash. (string.GetHashCode is randomized per
// process and System.Random's sequence is not promised across versions, so neither may decide
// which sample or document goes where.)
using System.Text;

namespace DeepSeekCluster.Text.Data;

public static class StableHash
{
    /// <summary>The splitmix64 finalizer: a bijection on 64-bit values with strong avalanche.</summary>
    public static ulong Mix(ulong z)
    {
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>Mixes two values into one, order-sensitive.</summary>
    public static ulong Combine(ulong a, ulong b) => Mix(Mix(a) ^ b);

    /// <summary>Hash of the UTF-8 bytes of <paramref name="text"/> under <paramref name="seed"/>.</summary>
    public static ulong OfText(string text, ulong seed)
    {
        // FNV-1a over the bytes, then splitmix so that nearby texts and seeds spread over all 64 bits.
        ulong h = 0xCBF29CE484222325UL;
        foreach (byte b in Encoding.UTF8.GetBytes(text))
            h = (h ^ b) * 0x100000001B3UL;
        return Combine(seed, h);
    }

    /// <summary>Maps a hash to a double uniform in [0, 1), from its top 53 bits.</summary>
    public static double ToUnitInterval(ulong hash) => (hash >> 11) * (1.0 / (1UL << 53));
}
