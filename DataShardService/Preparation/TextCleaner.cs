// Cleaning of one document: NFC, line endings, control characters; then length and quality filters, each counted.
using System.Globalization;
using System.Text;
using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>What cleaning did, document by document (the manifest's report.cleaning).</summary>
public sealed class CleaningCounts
{
    public long DocumentsIn { get; set; }
    public long NfcChanged { get; set; }
    public long ControlCharactersRemoved { get; set; }
    public long RemovedTooShort { get; set; }
    public long RemovedTooLong { get; set; }
    public long RemovedLowAlphabetic { get; set; }
    public long RemovedRepeatedLines { get; set; }
    public long RemovedDuplicateNGrams { get; set; }
    public long Kept { get; set; }
}

public sealed class TextCleaner(CleaningSpec spec)
{
    public CleaningCounts Counts { get; } = new();

    /// <summary>Counts a document the reader found too long to hold (see <see cref="SourceReader.Documents"/>).</summary>
    public void CountTooLong()
    {
        Counts.DocumentsIn++;
        Counts.RemovedTooLong++;
    }

    /// <summary>The cleaned text, or null when a filter removed the document.</summary>
    public string? Clean(string raw)
    {
        Counts.DocumentsIn++;
        string text = raw;
        if (!text.IsNormalized(NormalizationForm.FormC))
        {
            text = text.Normalize(NormalizationForm.FormC);
            Counts.NfcChanged++;
        }
        text = StripControls(text).Trim();

        if (text.Length < spec.MinChars) { Counts.RemovedTooShort++; return null; }
        if (text.Length > spec.MaxChars) { Counts.RemovedTooLong++; return null; }
        if (AlphabeticFraction(text) < spec.MinAlphabeticFraction) { Counts.RemovedLowAlphabetic++; return null; }
        if (RepeatedLineFraction(text) > spec.MaxRepeatedLineFraction) { Counts.RemovedRepeatedLines++; return null; }
        if (DuplicateNGramFraction(text, spec.DuplicateNGramWords) > spec.MaxDuplicateNGramFraction) { Counts.RemovedDuplicateNGrams++; return null; }
        Counts.Kept++;
        return text;
    }

    // "\r\n" and lone "\r" become "\n"; other C0/C1 controls (Unicode category Cc) except '\n' and '\t' go.
    private string StripControls(string text)
    {
        int i = 0;
        while (i < text.Length && (!char.IsControl(text[i]) || text[i] is '\n' or '\t'))
            i++;
        if (i == text.Length)
            return text;
        var sb = new StringBuilder(text.Length);
        sb.Append(text, 0, i);
        for (; i < text.Length; i++)
        {
            char c = text[i];
            if (c == '\r')
            {
                if (i + 1 < text.Length && text[i + 1] == '\n')
                    continue;
                sb.Append('\n');
            }
            else if (char.IsControl(c) && c is not '\n' and not '\t')
                Counts.ControlCharactersRemoved++;
            else
                sb.Append(c);
        }
        return sb.ToString();
    }

    internal static double AlphabeticFraction(string text)
    {
        int letters = 0, visible = 0;
        foreach (Rune r in text.EnumerateRunes())
        {
            if (Rune.IsWhiteSpace(r))
                continue;
            visible++;
            if (Rune.GetUnicodeCategory(r) is UnicodeCategory.UppercaseLetter or UnicodeCategory.LowercaseLetter
                or UnicodeCategory.TitlecaseLetter or UnicodeCategory.ModifierLetter or UnicodeCategory.OtherLetter
                or UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark)
                letters++;
        }
        return visible == 0 ? 0 : (double)letters / visible;
    }

    /// <summary>
    /// Gopher's repetition measure (Rae et al. 2021, table A1): words are whitespace-separated; a word n-gram is
    /// duplicate when it occurs more than once in the document; the result is the characters of the words covered
    /// by some duplicate n-gram (each word counted once) over the characters of all words. 0 for fewer than n words.
    /// </summary>
    internal static double DuplicateNGramFraction(string text, int n)
    {
        var words = new List<(int Length, ulong Hash)>();
        foreach (var range in text.AsSpan().SplitAny(" \t\n\r\f\v\u00A0"))
        {
            var word = text.AsSpan(range);
            if (!word.IsEmpty)
                words.Add((word.Length, WordHash(word)));
        }
        int grams = words.Count - n + 1;
        if (grams < 2)
            return 0;
        // An n-gram's key combines its words' hashes position by position; a rare collision can only over-count.
        var gramHash_G = new ulong[grams]; // G = number of n-grams
        var occurrences = new Dictionary<ulong, int>(grams);
        for (int g = 0; g < grams; g++)
        {
            ulong h = (ulong)n;
            for (int j = 0; j < n; j++)
                h = StableHash.Combine(h, words[g + j].Hash);
            gramHash_G[g] = h;
            occurrences[h] = occurrences.GetValueOrDefault(h) + 1;
        }
        long covered = 0, total = 0;
        int coveredUntil = 0; // words before this index are already counted
        for (int w = 0; w < words.Count; w++)
            total += words[w].Length;
        for (int g = 0; g < grams; g++)
        {
            if (occurrences[gramHash_G[g]] < 2)
                continue;
            for (int w = Math.Max(g, coveredUntil); w < g + n; w++)
                covered += words[w].Length;
            coveredUntil = g + n;
        }
        return total == 0 ? 0 : (double)covered / total;
    }

    // FNV-1a over UTF-16 code units: stable across processes (string.GetHashCode is not), so decisions are reproducible.
    private static ulong WordHash(ReadOnlySpan<char> word)
    {
        ulong h = 0xCBF2_9CE4_8422_2325UL;
        foreach (char c in word)
            h = (h ^ c) * 0x0000_0100_0000_01B3UL;
        return h;
    }

    internal static double RepeatedLineFraction(string text)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        int lines = 0, repeated = 0;
        foreach (var range in text.AsSpan().Split('\n'))
        {
            var line = text.AsSpan(range).Trim();
            if (line.IsEmpty)
                continue;
            lines++;
            if (!seen.Add(line.ToString()))
                repeated++;
        }
        return lines < 2 ? 0 : (double)repeated / lines;
    }
}
