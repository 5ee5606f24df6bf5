// GPT-2's pre-tokenization pattern as a hand-written scanner over spans: the same pieces as the regex, without the regex engine.
using System.Globalization;
using System.Runtime.CompilerServices;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Cuts text exactly where <see cref="PreTokenizer.Gpt2Pattern"/>,
/// <c>'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+</c>, run by .NET's regex engine
/// would: every char falls in one of the alternatives, so the matches tile the text and the pieces are the
/// matches themselves. At each position the first alternative that matches wins (regex alternation is ordered,
/// not longest-match), which the branches below follow in pattern order. Classes are the regex's: \p{L} is
/// char.IsLetter, \p{N} is char.IsNumber, \s is char.IsWhiteSpace, all per UTF-16 char (a surrogate is "other").
/// The tokenizer tests compare this scanner with the regex on random and hand-picked text.
/// </summary>
internal static class Gpt2Splitter
{
    private const byte Other = 0, Letter = 1, Number = 2, Space = 3;

    // ASCII classes by table; everything above goes through the Unicode category (still a table lookup).
    private static readonly byte[] AsciiClass = BuildAsciiClass();

    /// <summary>Appends the pieces of <paramref name="text"/> to <paramref name="output"/>.</summary>
    public static void Split(ReadOnlyMemory<char> text, List<ReadOnlyMemory<char>> output)
    {
        var span = text.Span;
        int i = 0;
        while (i < span.Length)
        {
            int end = PieceEnd(span, i);
            output.Add(text.Slice(i, end - i));
            i = end;
        }
    }

    /// <summary>The end (exclusive) of the piece that starts at <paramref name="i"/>.</summary>
    public static int PieceEnd(ReadOnlySpan<char> s, int i)
    {
        char c = s[i];
        if (c == '\'' && i + 1 < s.Length)
        {
            // 's|'t|'re|'ve|'m|'ll|'d, case-sensitive as in the pattern.
            char n = s[i + 1];
            if (n is 's' or 't' or 'm' or 'd') return i + 2;
            if (i + 2 < s.Length)
            {
                char n2 = s[i + 2];
                if ((n == 'r' && n2 == 'e') || (n == 'v' && n2 == 'e') || (n == 'l' && n2 == 'l')) return i + 3;
            }
        }

        byte cls = Class(c);
        // " ?X+": a single ' ' (U+0020 only, not other whitespace) joins the run of the class that follows it.
        int runStart = i;
        if (c == ' ' && i + 1 < s.Length)
        {
            byte next = Class(s[i + 1]);
            if (next != Space)
            {
                cls = next;
                runStart = i + 1;
            }
        }
        if (cls != Space)
        {
            int j = runStart + 1;
            while (j < s.Length && Class(s[j]) == cls) j++;
            return j;
        }

        // \s+(?!\S): the whitespace run, less its last char when a non-space follows (that char then leads the
        // next piece as its " ?"); a single whitespace char before a non-space is \s+ on its own.
        int k = i + 1;
        while (k < s.Length && Class(s[k]) == Space) k++;
        if (k == s.Length || k - i == 1) return k;
        return k - 1;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static byte Class(char c) => c < 128 ? AsciiClass[c] : UnicodeClass(c);

    private static byte UnicodeClass(char c)
    {
        if (char.IsWhiteSpace(c)) return Space;
        switch (char.GetUnicodeCategory(c))
        {
            case UnicodeCategory.UppercaseLetter:
            case UnicodeCategory.LowercaseLetter:
            case UnicodeCategory.TitlecaseLetter:
            case UnicodeCategory.ModifierLetter:
            case UnicodeCategory.OtherLetter:
                return Letter;
            case UnicodeCategory.DecimalDigitNumber:
            case UnicodeCategory.LetterNumber:
            case UnicodeCategory.OtherNumber:
                return Number;
            default:
                return Other;
        }
    }

    private static byte[] BuildAsciiClass()
    {
        var table = new byte[128];
        for (int c = 0; c < 128; c++)
        {
            table[c] = char.IsWhiteSpace((char)c) ? Space : char.IsLetter((char)c) ? Letter : char.IsNumber((char)c) ? Number : Other;
        }
        return table;
    }
}
