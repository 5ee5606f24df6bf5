// What the dedup index costs per kept document, measured on the managed heap; run alone so no other test's
// allocations are counted.
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Tests;

[CollectionDefinition(nameof(DedupMemoryTests), DisableParallelization = true)]
public sealed class DedupMemoryCollection;

[Collection(nameof(DedupMemoryTests))]
public sealed class DedupMemoryTests
{
    [Fact]
    public void TheIndexHoldsAboutOnePointSevenKilobytesPerKeptDocumentAtTheDefaults()
    {
        const int documents = 40_000;
        var texts = RandomDocuments(documents, seed: 1);
        long before = GC.GetTotalMemory(forceFullCollection: true);
        var dedup = new Deduplicator(new DedupSpec());
        foreach (string text in texts)
            Assert.Equal(DedupVerdict.Unique, dedup.Check(text, Deduplicator.TextHash(text)));
        long after = GC.GetTotalMemory(forceFullCollection: true);
        GC.KeepAlive(dedup);

        double perDocument = (after - before) / (double)documents;
        // The documented figure (Deduplicator, README; 1,670 bytes measured here): P = 128 signature entries of
        // 2 bytes, 32 bands of one dictionary entry and one 4-byte link, one exact-hash entry, and the
        // dictionaries' growth slack. The floor is what the entries alone take, so the measurement is not vacuous.
        Assert.InRange(perDocument, 256 + 32 * (16 + 4), 1900);
    }

    internal static List<string> RandomDocuments(int count, int seed, int words = 40)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => string.Join(' ',
            Enumerable.Range(0, words).Select(_ => new string(Enumerable.Range(0, random.Next(3, 9)).Select(_ => (char)('a' + random.Next(26))).ToArray())))).ToList();
    }
}
