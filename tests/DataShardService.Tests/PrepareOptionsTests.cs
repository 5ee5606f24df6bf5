// The cleaning and dedup options of the gRPC PrepareRequest: unset takes the default, set is applied, bad is refused by name.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class PrepareOptionsTests : IAsyncLifetime
{
    private readonly string _input = TestCorpus.NewFolder("options-input");
    private readonly string _store = TestCorpus.NewFolder("store");
    private IReadOnlyList<string> _chapters = [];
    private ServiceHost _host = null!;

    public async Task InitializeAsync()
    {
        _chapters = TestCorpus.FirstChapters(30);
        TestCorpus.WritePlain(_input, "bible.txt", _chapters);
        _host = await ServiceHost.StartAsync(_store);
    }

    public async Task DisposeAsync()
    {
        await _host.DisposeAsync();
        Directory.Delete(_input, true);
        Directory.Delete(_store, true);
    }

    [Fact]
    public async Task TheRepeatedNGramFilterTakesItsNAndRatioFromTheRequest()
    {
        var defaults = await PrepareAsync(new CleaningOptions());
        // Gopher's web-text ratio, and the ratio at n = 3: both must remove what a cleaner with that spec removes.
        var strict = await PrepareAsync(new CleaningOptions { MaxDuplicateNgramFraction = 0.15 });
        var trigrams = await PrepareAsync(new CleaningOptions { DuplicateNgramWords = 3, MaxDuplicateNgramFraction = 0.4 });

        Assert.Equal(Removed(new CleaningSpec()), defaults.Report.Cleaning.RemovedDuplicateNGrams);
        Assert.Equal(Removed(new CleaningSpec(MaxDuplicateNGramFraction: 0.15)), strict.Report.Cleaning.RemovedDuplicateNGrams);
        Assert.Equal(Removed(new CleaningSpec(DuplicateNGramWords: 3, MaxDuplicateNGramFraction: 0.4)), trigrams.Report.Cleaning.RemovedDuplicateNGrams);
        // The options really change the outcome (so the equalities above are not all the default's).
        Assert.True(strict.Report.Cleaning.RemovedDuplicateNGrams > defaults.Report.Cleaning.RemovedDuplicateNGrams);
        Assert.NotEqual(strict.Report.Cleaning.RemovedDuplicateNGrams, trigrams.Report.Cleaning.RemovedDuplicateNGrams);
        Assert.Equal(0.15, strict.Cleaning.MaxDuplicateNGramFraction);
        Assert.Equal(3, trigrams.Cleaning.DuplicateNGramWords);
        Assert.NotEqual(defaults.DatasetId, strict.DatasetId); // different options, different dataset
    }

    [Fact]
    public async Task UnsetOptionsTakeTheDefaultsAndASetZeroIsHonoured()
    {
        var unset = await PrepareAsync(null);
        Assert.Equal(new CleaningSpec(), unset.Cleaning);
        Assert.Equal(new DedupSpec(), unset.Dedup);

        // min_chars = 0 is a real value (no minimum), not "use the default" as it was before fields had presence.
        var zero = await PrepareAsync(new CleaningOptions { MinChars = 0, MinAlphabeticFraction = 0 });
        Assert.Equal(0, zero.Cleaning.MinChars);
        Assert.Equal(0, zero.Cleaning.MinAlphabeticFraction);
        Assert.Equal(new CleaningSpec().MaxChars, zero.Cleaning.MaxChars);
    }

    [Theory]
    [InlineData("cleaning.duplicate_ngram_words", "0")]
    [InlineData("cleaning.max_duplicate_ngram_fraction", "0")]
    [InlineData("cleaning.max_duplicate_ngram_fraction", "1.5")]
    [InlineData("cleaning.max_duplicate_ngram_fraction", "NaN")]
    [InlineData("cleaning.min_chars", "-1")]
    [InlineData("cleaning.max_chars", "10")]
    [InlineData("cleaning.min_alphabetic_fraction", "-0.1")]
    [InlineData("cleaning.max_repeated_line_fraction", "2")]
    [InlineData("dedup.shingle_words", "0")]
    [InlineData("dedup.permutations", "0")]
    [InlineData("dedup.bands", "7")]
    [InlineData("dedup.threshold", "0")]
    public async Task AnOutOfRangeOptionIsRefusedNamingTheField(string field, string value)
    {
        var request = TestCorpus.Request(32, 259, 1000, new Source { Name = "bible", Path = _input });
        request.Cleaning = new CleaningOptions();
        request.Dedup = new DedupOptions();
        double x = double.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
        switch (field)
        {
            case "cleaning.duplicate_ngram_words": request.Cleaning.DuplicateNgramWords = (int)x; break;
            case "cleaning.max_duplicate_ngram_fraction": request.Cleaning.MaxDuplicateNgramFraction = x; break;
            case "cleaning.min_chars": request.Cleaning.MinChars = (int)x; break;
            case "cleaning.max_chars": request.Cleaning.MaxChars = (int)x; break; // below the default min_chars (64)
            case "cleaning.min_alphabetic_fraction": request.Cleaning.MinAlphabeticFraction = x; break;
            case "cleaning.max_repeated_line_fraction": request.Cleaning.MaxRepeatedLineFraction = x; break;
            case "dedup.shingle_words": request.Dedup.ShingleWords = (int)x; break;
            case "dedup.permutations": request.Dedup.Permutations = (int)x; break;
            case "dedup.bands": request.Dedup.Bands = (int)x; break; // 7 does not divide 128
            case "dedup.threshold": request.Dedup.Threshold = x; break;
            default: throw new ArgumentException(field);
        }
        var e = await Assert.ThrowsAsync<RpcException>(() => _host.Client.PrepareAsync(request).ResponseAsync);
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains(field, e.Status.Detail);
        Assert.Empty(Directory.GetFileSystemEntries(_store)); // nothing was written
    }

    private async Task<DatasetManifest> PrepareAsync(CleaningOptions? cleaning)
    {
        var request = TestCorpus.Request(32, 259, 1000, new Source { Name = "bible", Path = _input });
        if (cleaning is not null) request.Cleaning = cleaning;
        var reply = await _host.Client.PrepareAsync(request);
        return DatasetManifest.FromJson(
            (await _host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = reply.DatasetId })).ManifestJson, "test");
    }

    // What a cleaner with this spec removes for repeated n-grams, run here on the same documents.
    private long Removed(CleaningSpec spec)
    {
        var cleaner = new TextCleaner(spec);
        foreach (string chapter in _chapters) cleaner.Clean(chapter);
        return cleaner.Counts.RemovedDuplicateNGrams;
    }
}
