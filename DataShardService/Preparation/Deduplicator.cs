// Exact (SHA-256 of the cleaned text) and near-duplicate (MinHash over word shingles, LSH banding) dedup.
// Keeps the first occurrence in input order; holds hashes and signatures of kept documents, never texts.
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using DeepSeekCluster.Training.Data;

namespace DeepSeekCluster.DataShardService.Preparation;

public enum DedupVerdict { Unique, ExactDuplicate, NearDuplicate }

public sealed class DedupCounts
{
    public long DocumentsIn { get; set; }
    public long RemovedExact { get; set; }
    public long RemovedNear { get; set; }
    public long Kept { get; set; }
}

/// <summary>
/// Legend: P permutations (signature length), B bands of R = P / B rows.
/// A document's signature is, for each of P hash functions, the minimum over its word k-gram shingles.
/// Two documents whose signatures agree on all R rows of some band become candidates; a candidate is a
/// near-duplicate when the fraction of equal signature entries (the Jaccard estimate) reaches the threshold.
/// Only kept documents enter the buckets, so a document is compared with earlier kept ones and the first wins.
/// </summary>
public sealed class Deduplicator
{
    private const ulong ShingleSeed = 0x5348_494E_474C_4531; // "SHINGLE1"
    private readonly DedupSpec _spec;
    private readonly int _rows;
    private readonly ulong[] _multiplier_P;
    private readonly ulong[] _offset_P;
    private readonly HashSet<UInt128> _exact = [];
    private readonly List<uint[]> _signatures = [];                 // of kept documents with shingles, by kept ordinal
    private readonly Dictionary<ulong, List<int>> _buckets = [];    // (band, band hash) -> kept ordinals

    public Deduplicator(DedupSpec spec)
    {
        _spec = spec;
        _rows = spec.Permutations / spec.Bands;
        _multiplier_P = new ulong[spec.Permutations];
        _offset_P = new ulong[spec.Permutations];
        for (int i = 0; i < spec.Permutations; i++)
        {
            // Multiply-shift hashing (odd multiplier, take the high 32 bits): a universal family, cheap per shingle.
            _multiplier_P[i] = StableHash.Mix(2UL * (ulong)i) | 1UL;
            _offset_P[i] = StableHash.Mix(2UL * (ulong)i + 1);
        }
    }

    public DedupCounts Counts { get; } = new();

    /// <summary>SHA-256 of the UTF-8 text, first 16 bytes: the document's identity for exact dedup and the split.</summary>
    public static UInt128 TextHash(string text) =>
        BinaryPrimitives.ReadUInt128LittleEndian(SHA256.HashData(Encoding.UTF8.GetBytes(text)));

    public DedupVerdict Check(string text, UInt128 hash)
    {
        Counts.DocumentsIn++;
        if (!_exact.Add(hash))
        {
            Counts.RemovedExact++;
            return DedupVerdict.ExactDuplicate;
        }
        if (_spec.NearDuplicates && Signature(text) is { } signature_P)
        {
            var bandKeys = BandKeys(signature_P);
            foreach (ulong key in bandKeys)
            {
                if (!_buckets.TryGetValue(key, out var candidates))
                    continue;
                foreach (int kept in candidates)
                {
                    if (EstimatedJaccard(signature_P, _signatures[kept]) >= _spec.Threshold)
                    {
                        Counts.RemovedNear++;
                        return DedupVerdict.NearDuplicate;
                    }
                }
            }
            int ordinal = _signatures.Count;
            _signatures.Add(signature_P);
            foreach (ulong key in bandKeys)
            {
                if (!_buckets.TryGetValue(key, out var list))
                    _buckets[key] = list = new List<int>(1);
                if (list.Count == 0 || list[^1] != ordinal)
                    list.Add(ordinal);
            }
        }
        Counts.Kept++;
        return DedupVerdict.Unique;
    }

    /// <summary>The MinHash signature over lower-cased word k-grams; null when the text has no word.</summary>
    internal uint[]? Signature(string text)
    {
        var wordHashes = WordHashes(text);
        if (wordHashes.Count == 0)
            return null;
        int k = Math.Min(_spec.ShingleWords, wordHashes.Count); // a text shorter than k words is one shingle
        var signature_P = new uint[_spec.Permutations];
        Array.Fill(signature_P, uint.MaxValue);
        for (int start = 0; start + k <= wordHashes.Count; start++)
        {
            ulong shingle = ShingleSeed;
            for (int j = 0; j < k; j++)
                shingle = StableHash.Combine(shingle, wordHashes[start + j]);
            for (int p = 0; p < signature_P.Length; p++)
            {
                uint v = (uint)((_multiplier_P[p] * shingle + _offset_P[p]) >> 32);
                if (v < signature_P[p])
                    signature_P[p] = v;
            }
        }
        return signature_P;
    }

    internal static double EstimatedJaccard(uint[] a_P, uint[] b_P)
    {
        int equal = 0;
        for (int p = 0; p < a_P.Length; p++)
            if (a_P[p] == b_P[p])
                equal++;
        return (double)equal / a_P.Length;
    }

    private ulong[] BandKeys(uint[] signature_P)
    {
        var keys = new ulong[_spec.Bands];
        for (int band = 0; band < _spec.Bands; band++)
        {
            ulong h = StableHash.Mix((ulong)band);
            for (int r = 0; r < _rows; r++)
                h = StableHash.Combine(h, signature_P[band * _rows + r]);
            keys[band] = h;
        }
        return keys;
    }

    // Words are maximal runs of letters and digits, lower-cased; each hashed with FNV-1a over its UTF-16 units.
    private static List<ulong> WordHashes(string text)
    {
        var hashes = new List<ulong>();
        ulong h = 0;
        bool inWord = false;
        foreach (char c in text)
        {
            if (char.IsLetterOrDigit(c))
            {
                if (!inWord) { h = 0xCBF29CE484222325UL; inWord = true; }
                h = (h ^ char.ToLowerInvariant(c)) * 0x100000001B3UL;
            }
            else if (inWord)
            {
                hashes.Add(StableHash.Mix(h));
                inWord = false;
            }
        }
        if (inWord)
            hashes.Add(StableHash.Mix(h));
        return hashes;
    }
}
