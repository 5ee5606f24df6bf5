// The cleaning filters and the deduplicator on their own, without the service.
using System.Text.Json;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class CleaningAndDedupTests
{
    [Fact]
    public void TheFirstOfTwoDuplicatesIsKept()
    {
        var chapters = TestCorpus.FirstChapters(3);
        var dedup = new Deduplicator(new DedupSpec());
        string near = TestCorpus.ChangeWords(chapters[0], every: 100);
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[0], Deduplicator.TextHash(chapters[0])));
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[1], Deduplicator.TextHash(chapters[1])));
        Assert.Equal(DedupVerdict.ExactDuplicate, dedup.Check(chapters[0], Deduplicator.TextHash(chapters[0])));
        Assert.Equal(DedupVerdict.NearDuplicate, dedup.Check(near, Deduplicator.TextHash(near)));
        Assert.Equal(DedupVerdict.Unique, dedup.Check(chapters[2], Deduplicator.TextHash(chapters[2])));
    }

    [Fact]
    public void TheReportSerializesEveryCleaningCounter()
    {
        var json = JsonSerializer.Serialize(new CleaningCounts(), DatasetManifest.Json);
        foreach (var key in new[] { "removed_too_short", "removed_too_long", "removed_low_alphabetic", "removed_repeated_lines", "removed_duplicate_n_grams", "control_characters_removed", "nfc_changed" })
            Assert.Contains(key, json);
    }

    [Fact]
    public void TheDuplicateNGramFractionCountsTheCharactersOfWordsInsideRepeatedNGrams()
    {
        // "one two three four five" occurs twice: 10 of the 11 words (38 of 43 characters) are covered.
        const string text = "one two three four five one two three four five seven";
        Assert.Equal(38.0 / 43, TextCleaner.DuplicateNGramFraction(text, 5), 6);
        Assert.Equal(0, TextCleaner.DuplicateNGramFraction("one two three four five six seven eight", 5));
        Assert.Equal(0, TextCleaner.DuplicateNGramFraction("too short", 5));
    }

    [Fact]
    public void TheDuplicateNGramFractionOfShippedChaptersMatchesAnIndependentReference()
    {
        // Values from a 10-line Python reference (str.split, collections.Counter over 5-tuples) on the same chapters.
        var chapters = ShippedCorpus.Documents().Take(93).ToArray();
        Assert.Equal(0.37647772052137013, TextCleaner.DuplicateNGramFraction(chapters[0], 5), 12);  // Genesis 1
        Assert.Equal(0.09911003236245955, TextCleaner.DuplicateNGramFraction(chapters[1], 5), 12);  // Genesis 2
        Assert.Equal(0.6906235126130414, TextCleaner.DuplicateNGramFraction(chapters[92], 5), 12);  // Leviticus 3
    }

    [Fact]
    public void ADocumentThatRepeatsItsParagraphsIsRemovedAndCountedWhileDistinctChaptersStay()
    {
        var chapters = TestCorpus.FirstChapters(3);
        var cleaner = new TextCleaner(new CleaningSpec());
        // Boilerplate pasted three times with distinct lines between: no line repeats on its own, the n-grams do.
        string paragraph = string.Join(' ', chapters[1].Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Take(60));
        string spammy = string.Join("\n", Enumerable.Range(0, 3).Select(i => $"Section {i} of the notice. {paragraph}"));
        Assert.True(TextCleaner.RepeatedLineFraction(spammy) <= 0.3);

        Assert.NotNull(cleaner.Clean(chapters[0]));
        Assert.Null(cleaner.Clean(spammy));
        Assert.NotNull(cleaner.Clean(chapters[2]));
        Assert.Equal(1, cleaner.Counts.RemovedDuplicateNGrams);
        Assert.Equal(2, cleaner.Counts.Kept);
    }

    [Fact]
    public void NearCopiesOfDocumentsFarBackInTheIndexAreFoundAndFreshOnesKept()
    {
        // 3,000 kept documents span three pages of the index (1,024 rows each); copies point into every page.
        var originals = DedupMemoryTests.RandomDocuments(3000, seed: 2, words: 200);
        var dedup = new Deduplicator(new DedupSpec());
        foreach (string text in originals)
            Assert.Equal(DedupVerdict.Unique, dedup.Check(text, Deduplicator.TextHash(text)));
        foreach (int i in new[] { 0, 1023, 1024, 2047, 2048, 2999 })
        {
            string near = TestCorpus.ChangeWords(originals[i], every: 100); // 2 words of 200 changed: Jaccard 186/206 = 0.90
            Assert.Equal(DedupVerdict.NearDuplicate, dedup.Check(near, Deduplicator.TextHash(near)));
            Assert.Equal(DedupVerdict.ExactDuplicate, dedup.Check(originals[i], Deduplicator.TextHash(originals[i])));
        }
        foreach (string fresh in DedupMemoryTests.RandomDocuments(50, seed: 3, words: 200))
            Assert.Equal(DedupVerdict.Unique, dedup.Check(fresh, Deduplicator.TextHash(fresh)));
        Assert.Equal(6, dedup.Counts.RemovedNear);
        Assert.Equal(6, dedup.Counts.RemovedExact);
        Assert.Equal(3050, dedup.Counts.Kept);
    }

    [Fact]
    public void ADocumentOrLineTooLongToHoldIsCountedWithoutBeingReadIntoMemory()
    {
        const int maxChars = 100; // held up to 4·100 + 1024 = 1424 chars; a line up to 6·1424 bytes
        string folder = TestCorpus.NewFolder("long");
        string path = Path.Combine(folder, "long.txt");
        string line = new('a', 49);
        string manyLines = string.Join("\n", Enumerable.Repeat(line, 40));   // 40·50 - 1 = 1999 chars, no blank line
        string oneLine = new('b', 9000);                                       // over 8544 bytes in one line
        File.WriteAllText(path, string.Join("\n\n", "first document", manyLines, "third document", oneLine, "fifth document") + "\n");
        var source = new SourceSpec("long", path);

        var docs = SourceReader.Documents(source, new SourceFile(path, "long.txt"), maxChars).ToList();
        Assert.Equal(["first document", null, "third document", null, "fifth document"], docs.Select(d => d.Text));
        Assert.Equal([14L, 1999, 14, 9000, 14], docs.Select(d => d.Bytes));
        Directory.Delete(folder, true);
    }
}
