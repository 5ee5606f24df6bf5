// Splits a chat template into text, {{ output }} and {% statement %} segments, with the whitespace rules Hugging Face
// renders with (trim_blocks, lstrip_blocks, `-` markers, no kept trailing newline), and tokenizes what is inside the tags.
using System.Globalization;
using System.Text;

namespace DeepSeekCluster.ModelServer.Templates;

public enum TokenKind { Name, String, Integer, Float, Operator }

public readonly record struct Token(TokenKind Kind, string Text, object? Value, Position At)
{
    public bool Is(string op) => Kind == TokenKind.Operator && Text == op;
    public bool IsName(string name) => Kind == TokenKind.Name && Text == name;
}

public enum SegmentKind { Text, Output, Statement }

public sealed record Segment(SegmentKind Kind, string Text, IReadOnlyList<Token> Tokens, Position At);

public sealed class TemplateLexer
{
    static readonly string[] TwoCharOperators = ["**", "//", "==", "!=", "<=", ">="];
    const string OneCharOperators = "+-*/%~|.,:()[]{}<>=";

    readonly string src;
    readonly string source;
    readonly List<int> lineStarts = [0];

    TemplateLexer(string text, string source)
    {
        // Jinja normalises newlines and, without keep_trailing_newline, drops one newline at the very end.
        src = text.Replace("\r\n", "\n");
        if (src.EndsWith('\n')) src = src[..^1];
        this.source = source;
        for (int i = 0; i < src.Length; i++)
            if (src[i] == '\n') lineStarts.Add(i + 1);
    }

    public static List<Segment> Lex(string text, string source) => new TemplateLexer(text, source).Run();

    Position At(int offset)
    {
        int line = lineStarts.BinarySearch(offset);
        if (line < 0) line = ~line - 1;
        return new Position(line + 1, offset - lineStarts[line] + 1);
    }

    TemplateSyntaxException Error(int offset, string message)
    {
        var at = At(offset);
        return new TemplateSyntaxException(source, at.Line, at.Column, message);
    }

    List<Segment> Run()
    {
        var segments = new List<Segment>();
        int i = 0;
        while (i < src.Length)
        {
            int open = NextOpen(i);
            string chunk = src[i..(open < 0 ? src.Length : open)];
            if (open < 0)
            {
                AddText(segments, chunk, i);
                break;
            }
            char kind = src[open + 1];
            int p = open + 2;
            bool stripBefore = p < src.Length && src[p] == '-', keepIndent = p < src.Length && src[p] == '+';
            if (stripBefore || keepIndent) p++;
            if (stripBefore) chunk = chunk.TrimEnd();
            else if (kind != '{' && !keepIndent) chunk = LstripBlock(chunk, i);
            AddText(segments, chunk, i);

            bool stripAfter;
            if (kind == '#')
            {
                int end = src.IndexOf("#}", p, StringComparison.Ordinal);
                if (end < 0) throw Error(open, "the comment '{#' is never closed with '#}'");
                stripAfter = end > p && src[end - 1] == '-';
                i = end + 2;
            }
            else
            {
                var tokens = Tokenize(p, kind == '{' ? '}' : '%', open, out i, out stripAfter);
                if (kind == '{')
                {
                    if (tokens.Count == 0) throw Error(open, "an empty '{{ }}' has no expression");
                    segments.Add(new Segment(SegmentKind.Output, "", tokens, At(open)));
                }
                else if (tokens.Count == 1 && tokens[0].IsName("raw"))
                {
                    i = Raw(segments, SkipAfterTag(i, stripAfter, block: true), open);
                    continue;
                }
                else segments.Add(new Segment(SegmentKind.Statement, "", tokens, At(open)));
            }
            i = SkipAfterTag(i, stripAfter, block: kind != '{');
        }
        return segments;
    }

    int NextOpen(int from)
    {
        for (int k = src.IndexOf('{', from); k >= 0 && k + 1 < src.Length; k = src.IndexOf('{', k + 1))
            if (src[k + 1] is '{' or '%' or '#') return k;
        return -1;
    }

    void AddText(List<Segment> segments, string text, int offset)
    {
        if (text.Length > 0) segments.Add(new Segment(SegmentKind.Text, text, [], At(offset)));
    }

    // lstrip_blocks: spaces and tabs between the start of a line and a block or comment tag are not output.
    string LstripBlock(string chunk, int chunkStart)
    {
        int nl = chunk.LastIndexOf('\n');
        bool lineStart = nl >= 0 || chunkStart == 0 || src[chunkStart - 1] == '\n';
        if (!lineStart) return chunk;
        for (int k = nl + 1; k < chunk.Length; k++)
            if (chunk[k] is not (' ' or '\t')) return chunk;
        return chunk[..(nl + 1)];
    }

    // `-` strips all whitespace after the tag; otherwise trim_blocks drops the one newline right after a block tag.
    int SkipAfterTag(int i, bool stripAfter, bool block)
    {
        if (stripAfter)
            while (i < src.Length && char.IsWhiteSpace(src[i])) i++;
        else if (block && i < src.Length && src[i] == '\n') i++;
        return i;
    }

    // {% raw %}…{% endraw %}: the text between is output as it is.
    int Raw(List<Segment> segments, int from, int open)
    {
        for (int k = NextOpen(from); k >= 0; k = NextOpen(k + 2))
        {
            if (src[k + 1] != '%') continue;
            int p = k + 2;
            bool stripBefore = p < src.Length && src[p] == '-';
            if (stripBefore || (p < src.Length && src[p] == '+')) p++;
            var tokens = Tokenize(p, '%', k, out int end, out bool stripAfter);
            if (tokens.Count != 1 || !tokens[0].IsName("endraw")) continue;
            string text = src[from..k];
            AddText(segments, stripBefore ? text.TrimEnd() : LstripBlock(text, from), from);
            return SkipAfterTag(end, stripAfter, block: true);
        }
        throw Error(open, "'{% raw %}' is never closed with '{% endraw %}'");
    }

    List<Token> Tokenize(int p, char closer, int open, out int end, out bool stripAfter)
    {
        var tokens = new List<Token>();
        int depth = 0;
        while (true)
        {
            while (p < src.Length && char.IsWhiteSpace(src[p])) p++;
            if (p >= src.Length) throw Error(open, $"the tag opened here is never closed with '{closer}}}'");
            char c = src[p];
            bool closes(int at) => at + 1 < src.Length && src[at] == closer && src[at + 1] == '}';
            if (depth == 0 && closes(p)) { end = p + 2; stripAfter = false; return tokens; }
            if (depth == 0 && c == '-' && closes(p + 1)) { end = p + 3; stripAfter = true; return tokens; }
            int start = p;
            if (char.IsLetter(c) || c == '_')
            {
                while (p < src.Length && (char.IsLetterOrDigit(src[p]) || src[p] == '_')) p++;
                tokens.Add(new Token(TokenKind.Name, src[start..p], null, At(start)));
            }
            else if (char.IsAsciiDigit(c)) tokens.Add(Number(ref p));
            else if (c is '\'' or '"') tokens.Add(new Token(TokenKind.String, "", ReadString(ref p), At(start)));
            else
            {
                string? op = TwoCharOperators.FirstOrDefault(o => string.CompareOrdinal(src, p, o, 0, 2) == 0);
                if (op is null && OneCharOperators.Contains(c)) op = c.ToString();
                if (op is null) throw Error(p, $"unexpected character '{c}' inside a tag");
                if (op is "(" or "[" or "{") depth++;
                else if (op is ")" or "]" or "}") depth--;
                p += op.Length;
                tokens.Add(new Token(TokenKind.Operator, op, null, At(start)));
            }
        }
    }

    Token Number(ref int p)
    {
        int start = p;
        bool isFloat = false;
        while (p < src.Length && (char.IsAsciiDigit(src[p]) || src[p] == '_')) p++;
        if (p + 1 < src.Length && src[p] == '.' && char.IsAsciiDigit(src[p + 1]))
        {
            isFloat = true;
            p++;
            while (p < src.Length && (char.IsAsciiDigit(src[p]) || src[p] == '_')) p++;
        }
        if (p < src.Length && src[p] is 'e' or 'E')
        {
            int q = p + 1;
            if (q < src.Length && src[q] is '+' or '-') q++;
            if (q < src.Length && char.IsAsciiDigit(src[q]))
            {
                isFloat = true;
                p = q;
                while (p < src.Length && char.IsAsciiDigit(src[p])) p++;
            }
        }
        string text = src[start..p].Replace("_", "");
        object value = isFloat ? (object)double.Parse(text, CultureInfo.InvariantCulture)
            : long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var n) ? n : throw Error(start, $"the integer {text} is too large");
        return new Token(isFloat ? TokenKind.Float : TokenKind.Integer, text, value, At(start));
    }

    // Python string literal escapes, as Jinja reads them; an unknown escape keeps its backslash.
    string ReadString(ref int p)
    {
        char quote = src[p];
        int start = p++;
        var text = new StringBuilder();
        while (true)
        {
            if (p >= src.Length) throw Error(start, "the string literal is never closed");
            char c = src[p++];
            if (c == quote) return text.ToString();
            if (c != '\\' || p >= src.Length) { text.Append(c); continue; }
            char e = src[p++];
            switch (e)
            {
                case 'n': text.Append('\n'); break;
                case 't': text.Append('\t'); break;
                case 'r': text.Append('\r'); break;
                case '0': text.Append('\0'); break;
                case 'b': text.Append('\b'); break;
                case 'f': text.Append('\f'); break;
                case '\\' or '\'' or '"': text.Append(e); break;
                case '\n': break;
                case 'x' or 'u' or 'U':
                    int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                    if (p + digits > src.Length || !int.TryParse(src.AsSpan(p, digits), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int code))
                        throw Error(p - 2, $"'\\{e}' must be followed by {digits} hex digits");
                    text.Append(char.ConvertFromUtf32(code));
                    p += digits;
                    break;
                default: text.Append('\\').Append(e); break;
            }
        }
    }
}
