using System.IO.Compression;
using System.Text;
using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.Training.Tests.Data;

public class ShippedCorpusTests
{
    [Fact]
    public void TheCorpusIsCopiedNextToTheBinaries()
    {
        string beside = Path.Combine(AppContext.BaseDirectory, ShippedCorpus.OutputPath);
        Assert.True(File.Exists(beside), $"missing {beside}: the <None Include=...> item in Training.csproj did not copy it");
        Assert.Equal(beside, ShippedCorpus.Locate());
    }

    [Fact]
    public void TheShippedCorpusHasOneDocumentPerChapterOfTheBible()
    {
        var docs = ShippedCorpus.Documents().ToList();

        Assert.Equal(1189, docs.Count);
        Assert.StartsWith("Genesis 1\nIn the beginning God created the heaven and the earth.\n", docs[0]);
        Assert.StartsWith("Revelation 22\n", docs[^1]);
        Assert.EndsWith("The grace of our Lord Jesus Christ be with you all. Amen.", docs[^1]);
        Assert.Equal("Obadiah 1", docs.Single(d => d.StartsWith("Obadiah", StringComparison.Ordinal)).Split('\n')[0]);
        Assert.All(docs, d => Assert.DoesNotContain("\n\n", d));
        Assert.Equal(1189, docs.Distinct().Count());
    }

    [Fact]
    public void DocumentsAreReadFromAnExplicitPathAndSeparatedByEmptyLines()
    {
        string path = Path.Combine(Path.GetTempPath(), $"corpus-{Guid.NewGuid():N}.txt.gz");
        try
        {
            using (var gz = new GZipStream(File.Create(path), CompressionLevel.Fastest))
                gz.Write(Encoding.UTF8.GetBytes("A 1\nfirst\nsecond\n\nB 1\nthird\n\n\nC 1\nfourth\n"));

            Assert.Equal(["A 1\nfirst\nsecond", "B 1\nthird", "C 1\nfourth"], ShippedCorpus.Documents(path));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void AMissingExplicitPathIsReportedByName()
    {
        var e = Assert.Throws<FileNotFoundException>(() => ShippedCorpus.Documents("/no/such/corpus.txt.gz").First());
        Assert.Contains("/no/such/corpus.txt.gz", e.Message);
    }

    [Fact]
    public void TheSplitIsDeterministicAndNoDocumentCrossesIt()
    {
        var docs = ShippedCorpus.Documents().ToList();

        var (train, validation) = ShippedCorpus.Split(docs, 0.1, seed: 7);
        var (trainReversed, validationReversed) = ShippedCorpus.Split(Enumerable.Reverse(docs), 0.1, seed: 7);

        Assert.Equal(docs.Count, train.Count + validation.Count);
        Assert.Empty(train.Intersect(validation));
        Assert.InRange(validation.Count, 0.06 * docs.Count, 0.14 * docs.Count);
        // A document's side depends on its text and the seed only, not on order.
        Assert.Equal(validation.ToHashSet(), validationReversed.ToHashSet());
        Assert.Equal(train.ToHashSet(), trainReversed.ToHashSet());
        // The split keeps the input order within each side.
        Assert.Equal(docs.Where(validation.ToHashSet().Contains), validation);
    }

    [Fact]
    public void DifferentSeedsSplitDifferently()
    {
        var docs = ShippedCorpus.Documents().ToList();

        var (_, a) = ShippedCorpus.Split(docs, 0.1, seed: 1);
        var (_, b) = ShippedCorpus.Split(docs, 0.1, seed: 2);

        Assert.NotEqual(a.ToHashSet(), b.ToHashSet());
    }

    [Fact]
    public void TheSplitIsPinnedForAGivenSeed()
    {
        // Changing the hash would silently move documents between train and validation in
        // existing runs; this test notices.
        var (_, validation) = ShippedCorpus.Split(ShippedCorpus.Documents(), 0.1, seed: 1234);

        Assert.Equal(PinnedValidationTitles, validation.Take(5).Select(d => d.Split('\n')[0]));
    }

    private static readonly string[] PinnedValidationTitles = ["Genesis 7", "Genesis 16", "Exodus 18", "Exodus 21", "Exodus 34"];

    [Theory]
    [InlineData(-0.1)]
    [InlineData(1.5)]
    [InlineData(double.NaN)]
    public void AValidationFractionOutsideZeroToOneIsRefused(double fraction) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => ShippedCorpus.Split(["a"], fraction, seed: 0));
}
