// The global sample addressing of DESIGN.md ("Samples are addressed by global index"): epoch e
// visits samples in a seeded permutation of [0, SampleCount); step s of a job with global batch G
// consumes global indices [s·G, (s+1)·G) of the epochs' permutations laid end to end, and
// data-parallel rank r takes its contiguous slice of that range. Not a data loader.
namespace DeepSeekCluster.Text.Data;

/// <summary>
/// A keyed pseudo-random permutation computed on the fly: a balanced Feistel network over the
/// smallest even bit width whose domain covers SampleCount, with cycle-walking to stay inside
/// [0, SampleCount). Each call is O(1) memory and a few dozen multiplications (at most ~4 walks
/// expected, as the domain is under 4·SampleCount), so epochs of billions of samples cost nothing
/// to hold, and every process computes the same order from (seed, epoch) alone. The round
/// function is splitmix64 (see <see cref="StableHash"/>), never System.Random or GetHashCode.
/// </summary>
public sealed class SamplePermutation
{
    private const int Rounds = 6; // 3 rounds make a PRP in theory; 6 leave no visible structure in small domains.

    private readonly int _halfBits;
    private readonly ulong _halfMask;

    public SamplePermutation(long sampleCount, ulong seed)
    {
        if (sampleCount < 1)
            throw new ArgumentOutOfRangeException(nameof(sampleCount), sampleCount,
                "A permutation needs at least one sample.");
        SampleCount = sampleCount;
        Seed = seed;

        int bits = 64 - System.Numerics.BitOperations.LeadingZeroCount((ulong)(sampleCount - 1)); // ⌈log2 N⌉
        _halfBits = Math.Max(1, (bits + 1) / 2);
        _halfMask = (1UL << _halfBits) - 1;
    }

    public long SampleCount { get; }

    public ulong Seed { get; }

    /// <summary>The sample at <paramref name="globalIndex"/> = epoch·SampleCount + position.</summary>
    public long SampleAt(long globalIndex)
    {
        if (globalIndex < 0)
            throw new ArgumentOutOfRangeException(nameof(globalIndex), globalIndex, "A global sample index cannot be negative.");
        long epoch = globalIndex / SampleCount;
        long position = globalIndex % SampleCount;
        return Permute(position, epoch);
    }

    /// <summary>The epoch that <paramref name="globalIndex"/> falls in.</summary>
    public long EpochOf(long globalIndex) => globalIndex / SampleCount;

    /// <summary>
    /// The samples of data-parallel rank <paramref name="rank"/> at <paramref name="step"/>: the
    /// rank's contiguous share, globalBatch / worldSize long, of global indices
    /// [step·globalBatch, (step+1)·globalBatch). The ranks' slices in rank order are the step's
    /// global batch, whatever the world size.
    /// </summary>
    public IReadOnlyList<long> Slice(long step, int globalBatch, int rank, int worldSize)
    {
        if (step < 0)
            throw new ArgumentOutOfRangeException(nameof(step), step, "The step cannot be negative.");
        if (globalBatch < 1)
            throw new ArgumentOutOfRangeException(nameof(globalBatch), globalBatch, "The global batch must be at least one sample.");
        if (worldSize < 1)
            throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "The world size must be at least 1.");
        if (globalBatch % worldSize != 0)
            throw new ArgumentException(
                $"The global batch ({globalBatch} samples) must be divisible by the data-parallel world size ({worldSize}).",
                nameof(globalBatch));
        if (rank < 0 || rank >= worldSize)
            throw new ArgumentOutOfRangeException(nameof(rank), rank, $"The rank must be in [0, {worldSize}).");

        int perRank = globalBatch / worldSize;
        long first = checked(step * globalBatch + (long)rank * perRank);
        var slice = new long[perRank];
        for (int i = 0; i < perRank; i++)
            slice[i] = SampleAt(first + i);
        return slice;
    }

    // ---- Feistel network ----

    private long Permute(long position, long epoch)
    {
        if (SampleCount == 1)
            return 0;
        ulong epochKey = StableHash.Combine(Seed, (ulong)epoch);
        ulong x = (ulong)position;
        // Cycle-walking: the network permutes [0, 2^(2·halfBits)); re-encrypting until the value
        // lands below SampleCount gives a permutation of [0, SampleCount), since x starts there.
        do
            x = Encrypt(x, epochKey);
        while (x >= (ulong)SampleCount);
        return (long)x;
    }

    private ulong Encrypt(ulong x, ulong epochKey)
    {
        ulong left = x >> _halfBits;
        ulong right = x & _halfMask;
        for (int round = 0; round < Rounds; round++)
        {
            ulong f = StableHash.Combine(epochKey ^ (ulong)round, right) & _halfMask;
            (left, right) = (right, left ^ f);
        }
        return (left << _halfBits) | right;
    }
}
