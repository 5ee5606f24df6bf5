// Cleaning of one document: NFC, line endings, control characters; then length and quality filters, each counted.
using System.Globalization;
using System.Text;

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
    public long Kept { get; set; }
}

public sealed class TextCleaner(CleaningSpec spec)
{
    public CleaningCounts Counts { get; } = new();

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
