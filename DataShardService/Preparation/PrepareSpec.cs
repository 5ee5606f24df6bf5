// What a prepare run is asked to do: sources with mixing weights, cleaning and dedup knobs, tokenizer and packing shape.
namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>
/// One named input. <see cref="Weight"/> is how many times each kept document enters the mix:
/// the integer part in full, the fractional part for a share of documents chosen by their text hash
/// (0.5 = a deterministic half, 2.5 = every document twice and half of them a third time).
/// </summary>
public sealed record SourceSpec(string Name, string Path, double Weight = 1.0, string TextField = "text", bool WholeFile = false);

public sealed record CleaningSpec(
    int MinChars = 64,
    int MaxChars = 1_000_000,
    double MinAlphabeticFraction = 0.6,   // letters / non-whitespace characters
    double MaxRepeatedLineFraction = 0.3,  // lines equal to an earlier line of the same document / non-empty lines
    int DuplicateNGramWords = 5,           // Gopher's repetition rule at its first n: characters of words inside
    double MaxDuplicateNGramFraction = 0.5); // word n-grams that occur more than once / characters of all words.
    // Gopher uses 0.15 on web text; on the shipped KJV that removes 181 of 1189 chapters (Genesis 1 among them),
    // 0.5 removes 9 list-like ones (Numbers 7's twelve identical offerings) and any text pasted twice. Use 0.15 for crawls.

public sealed record DedupSpec(
    bool NearDuplicates = true,
    int ShingleWords = 5,
    int Permutations = 128,
    int Bands = 32,          // 32 bands of 4 rows: a pair at Jaccard 0.8 becomes a candidate with probability > 0.999
    double Threshold = 0.8); // estimated Jaccard at or above which a later document is dropped

public sealed record PrepareSpec(
    IReadOnlyList<SourceSpec> Sources,
    int SeqLen,
    int VocabSize = 512,
    string? TokenizerPath = null,
    double ValidationFraction = 0.05,
    int SamplesPerShard = 8192,
    CleaningSpec? Cleaning = null,
    DedupSpec? Dedup = null)
{
    public CleaningSpec CleaningOrDefault => Cleaning ?? new CleaningSpec();

    public DedupSpec DedupOrDefault => Dedup ?? new DedupSpec();

    /// <summary>Throws <see cref="DataInputException"/> naming the first bad field.</summary>
    public void Validate()
    {
        if (Sources.Count == 0)
            throw DataInputException.Invalid("No sources were given: a prepare needs at least one source (name, path).");
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var s in Sources)
        {
            if (string.IsNullOrWhiteSpace(s.Name))
                throw DataInputException.Invalid($"The source with path '{s.Path}' has no name.");
            if (!names.Add(s.Name))
                throw DataInputException.Invalid($"Source name '{s.Name}' is used twice.");
            if (string.IsNullOrWhiteSpace(s.Path))
                throw DataInputException.Invalid($"Source '{s.Name}' has no path.");
            if (!(s.Weight > 0 && s.Weight <= 1000))
                throw DataInputException.Invalid($"Source '{s.Name}' has weight {s.Weight}: expected a number in (0, 1000].");
            if (string.IsNullOrEmpty(s.TextField))
                throw DataInputException.Invalid($"Source '{s.Name}' has an empty JSONL text field name.");
        }
        if (SeqLen < 1)
            throw DataInputException.Invalid($"seq_len is {SeqLen}: expected at least 1.");
        if (TokenizerPath is null && VocabSize < 259)
            throw DataInputException.Invalid($"vocab_size is {VocabSize}: a trained byte-level tokenizer needs at least 259 (3 special tokens + 256 bytes).");
        if (!(ValidationFraction >= 0 && ValidationFraction < 1))
            throw DataInputException.Invalid($"validation_fraction is {ValidationFraction}: expected a number in [0, 1).");
        if (SamplesPerShard < 1)
            throw DataInputException.Invalid($"samples_per_shard is {SamplesPerShard}: expected at least 1.");
        // Field names as the gRPC request spells them (PrepareRequest.cleaning / .dedup).
        var c = CleaningOrDefault;
        if (c.MinChars < 0)
            throw DataInputException.Invalid($"cleaning.min_chars is {c.MinChars}: expected at least 0.");
        if (c.MaxChars < c.MinChars)
            throw DataInputException.Invalid($"cleaning.max_chars is {c.MaxChars}: expected at least cleaning.min_chars ({c.MinChars}).");
        if (!(c.MinAlphabeticFraction >= 0 && c.MinAlphabeticFraction <= 1))
            throw DataInputException.Invalid($"cleaning.min_alphabetic_fraction is {c.MinAlphabeticFraction}: expected a number in [0, 1].");
        if (!(c.MaxRepeatedLineFraction >= 0 && c.MaxRepeatedLineFraction <= 1))
            throw DataInputException.Invalid($"cleaning.max_repeated_line_fraction is {c.MaxRepeatedLineFraction}: expected a number in [0, 1].");
        if (c.DuplicateNGramWords < 1)
            throw DataInputException.Invalid($"cleaning.duplicate_ngram_words is {c.DuplicateNGramWords}: expected at least 1.");
        if (!(c.MaxDuplicateNGramFraction > 0 && c.MaxDuplicateNGramFraction <= 1))
            throw DataInputException.Invalid($"cleaning.max_duplicate_ngram_fraction is {c.MaxDuplicateNGramFraction}: expected a number in (0, 1].");
        var d = DedupOrDefault;
        if (d.ShingleWords < 1)
            throw DataInputException.Invalid($"dedup.shingle_words is {d.ShingleWords}: expected at least 1.");
        if (d.Permutations < 1)
            throw DataInputException.Invalid($"dedup.permutations is {d.Permutations}: expected at least 1.");
        if (d.Bands < 1 || d.Permutations % d.Bands != 0)
            throw DataInputException.Invalid($"dedup.bands is {d.Bands}: expected a divisor of dedup.permutations ({d.Permutations}).");
        if (!(d.Threshold > 0 && d.Threshold <= 1))
            throw DataInputException.Invalid($"dedup.threshold is {d.Threshold}: expected a number in (0, 1].");
    }
}
