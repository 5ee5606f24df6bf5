// Added (special) tokens and the leftmost-longest matcher that splits them out of text before pre-tokenization.
using System.Buffers;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>One entry of tokenizer.json's "added_tokens", with the Hugging Face field meanings.</summary>
public sealed record AddedToken(
    int Id,
    string Content,
    bool SingleWord = false,
    bool LStrip = false,
    bool RStrip = false,
    bool Normalized = false,
    bool Special = true);

/// <summary>
/// Finds added tokens in text the way `tokenizers` does (Aho-Corasick, leftmost-longest): at the first
/// position where any token matches, the longest token there wins. Candidates are bucketed by their first
/// char, and a vectorized search skips to the next char that starts any token, so text without those chars
/// (most English) is passed over at memory speed.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private readonly Dictionary<char, AddedToken[]> _byFirstChar;
    private readonly SearchValues<char> _firstChars;

    public AddedTokenMatcher(IEnumerable<AddedToken> tokens)
    {
        _byFirstChar = tokens
            .Where(t => t.Content.Length > 0)
            .GroupBy(t => t.Content[0])
            .ToDictionary(g => g.Key, g => g.OrderByDescending(t => t.Content.Length).ToArray());
        _firstChars = SearchValues.Create(_byFirstChar.Keys.ToArray());
    }

    public bool IsEmpty => _byFirstChar.Count == 0;

    /// <summary>
    /// Cuts <paramref name="text"/> into plain segments (token == null) and added-token segments.
    /// lstrip/rstrip swallow the whitespace next to the token; single_word refuses matches inside a word.
    /// </summary>
    public void Split(string text, List<(int Start, int Length, AddedToken? Token)> segments)
    {
        segments.Clear();
        int plainStart = 0;
        int i = 0;
        while (i < text.Length)
        {
            int skip = text.AsSpan(i).IndexOfAny(_firstChars);
            if (skip < 0) break;
            i += skip;
            if (_byFirstChar.TryGetValue(text[i], out var candidates) && TryMatchAt(text, i, candidates, out var token))
            {
                int start = i, end = i + token.Content.Length;
                if (token.LStrip) while (start > plainStart && char.IsWhiteSpace(text[start - 1])) start--;
                if (token.RStrip) while (end < text.Length && char.IsWhiteSpace(text[end])) end++;
                if (start > plainStart) segments.Add((plainStart, start - plainStart, null));
                segments.Add((start, end - start, token));
                i = plainStart = end;
            }
            else
            {
                i++;
            }
        }
        if (plainStart < text.Length) segments.Add((plainStart, text.Length - plainStart, null));
    }

    private static bool TryMatchAt(string text, int i, AddedToken[] candidates, out AddedToken token)
    {
        foreach (var candidate in candidates)
        {
            if (candidate.Content.Length > text.Length - i) continue;
            if (string.CompareOrdinal(text, i, candidate.Content, 0, candidate.Content.Length) != 0) continue;
            if (candidate.SingleWord && !IsWordBoundaryMatch(text, i, i + candidate.Content.Length)) continue;
            token = candidate;
            return true;
        }
        token = null!;
        return false;
    }

    private static bool IsWordBoundaryMatch(string text, int start, int end)
    {
        static bool IsWordChar(char c) => char.IsLetterOrDigit(c) || c == '_';
        return (start == 0 || !IsWordChar(text[start - 1])) && (end == text.Length || !IsWordChar(text[end]));
    }
}
