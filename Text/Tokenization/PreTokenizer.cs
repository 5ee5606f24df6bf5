// Pre-tokenization: the chain of splitting steps (Split, Digits, ByteLevel) that cuts text into the pieces BPE merges within.
using System.Text.Json;
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// The "pre_tokenizer" of tokenizer.json, applied as `tokenizers` applies it: each step splits every piece
/// the previous step produced; pieces never merge back. ByteLevel must be the last step: its byte-to-char
/// mapping is done by the BPE model on each final piece's UTF-8 bytes, which is the same thing as mapping
/// first and handing the mapped pieces on, only without the extra strings.
///
/// Regexes run on .NET's engine, not Oniguruma. The patterns in use (GPT-2's, DeepSeek-V3's) mean the same on
/// both for text in the Basic Multilingual Plane. One known difference: .NET sees a char outside the BMP as
/// two surrogates (category Cs), so an astral letter (e.g. U+20000) matches [^\s\p{L}\p{N}] rather than \p{L};
/// encodings of such text can differ from `tokenizers` (they still decode losslessly).
/// </summary>
internal sealed class PreTokenizer
{
    /// <summary>The pattern of GPT-2 and of `tokenizers`' ByteLevel pre-tokenizer with use_regex = true.</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// <summary>The pattern on .NET's engine: the reference <see cref="Gpt2Splitter"/> is tested against (encoding uses the splitter).</summary>
    internal static readonly Regex Gpt2Regex = new(Gpt2Pattern, RegexOptions.Compiled | RegexOptions.CultureInvariant);

    private readonly PreTokenizerStep[] _steps;
    private readonly bool _isSequence;

    public PreTokenizer(IReadOnlyList<PreTokenizerStep> steps, bool isSequence)
    {
        _steps = steps.ToArray();
        _isSequence = isSequence;
    }

    /// <summary>What a freshly trained tokenizer uses: a lone ByteLevel(add_prefix_space = false, use_regex = true).</summary>
    public static PreTokenizer DefaultByteLevel() => new([new ByteLevelStep(AddPrefixSpace: false, TrimOffsets: true, UseRegex: true)], isSequence: false);

    /// <summary>Appends the pieces of <paramref name="text"/> to <paramref name="pieces"/> (which is cleared first).</summary>
    public void Split(ReadOnlyMemory<char> text, List<ReadOnlyMemory<char>> pieces, List<ReadOnlyMemory<char>> scratch)
    {
        pieces.Clear();
        if (_steps.Length == 1)
        {
            _steps[0].Split(text, pieces); // the common case: no copying between steps
            return;
        }
        pieces.Add(text);
        foreach (var step in _steps)
        {
            scratch.Clear();
            foreach (var piece in pieces) step.Split(piece, scratch);
            pieces.Clear();
            pieces.AddRange(scratch);
        }
    }

    public void WriteJson(Utf8JsonWriter writer)
    {
        if (!_isSequence)
        {
            _steps[0].WriteJson(writer);
            return;
        }
        writer.WriteStartObject();
        writer.WriteString("type", "Sequence");
        writer.WriteStartArray("pretokenizers");
        foreach (var step in _steps) step.WriteJson(writer);
        writer.WriteEndArray();
        writer.WriteEndObject();
    }

    /// <summary>Reads "pre_tokenizer"; anything but ByteLevel, Split, Digits and Sequence of them is refused.</summary>
    public static PreTokenizer FromJson(JsonElement element, string source)
    {
        string type = TokenizerJsonReader.GetType(element, "pre_tokenizer", source);
        var steps = new List<PreTokenizerStep>();
        bool isSequence = type == "Sequence";
        if (isSequence)
        {
            if (!element.TryGetProperty("pretokenizers", out var list) || list.ValueKind != JsonValueKind.Array)
                throw new TokenizerFormatException(source, "pre_tokenizer of type Sequence has no \"pretokenizers\" array");
            foreach (var item in list.EnumerateArray()) steps.Add(ReadStep(item, source));
        }
        else
        {
            steps.Add(ReadStep(element, source));
        }
        int byteLevelAt = steps.FindIndex(s => s is ByteLevelStep);
        if (byteLevelAt < 0)
            throw new TokenizerFormatException(source, "pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
        if (byteLevelAt != steps.Count - 1)
            throw new TokenizerFormatException(source, "pre_tokenizer: ByteLevel must be the last step of the Sequence (steps after it would split byte-mapped text, which is not supported)");
        return new PreTokenizer(steps, isSequence);
    }

    private static PreTokenizerStep ReadStep(JsonElement element, string source)
    {
        string type = TokenizerJsonReader.GetType(element, "pre_tokenizer", source);
        switch (type)
        {
            case "ByteLevel":
                return new ByteLevelStep(
                    TokenizerJsonReader.GetBool(element, "add_prefix_space", false),
                    TokenizerJsonReader.GetBool(element, "trim_offsets", true),
                    TokenizerJsonReader.GetBool(element, "use_regex", true));
            case "Digits":
                return new DigitsStep(TokenizerJsonReader.GetBool(element, "individual_digits", false));
            case "Split":
                return SplitStep.FromJson(element, source);
            default:
                throw new TokenizerFormatException(source, $"unsupported pre_tokenizer type \"{type}\" (supported: ByteLevel, Split, Digits, Sequence)");
        }
    }

    // ---- Steps ----

    internal abstract record PreTokenizerStep
    {
        public abstract void Split(ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output);
        public abstract void WriteJson(Utf8JsonWriter writer);
    }

    /// <summary>Pieces for the matches of <paramref name="regex"/> and for the gaps between them (behaviour Isolated).</summary>
    private static void SplitIsolated(Regex regex, ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output)
    {
        int last = 0;
        foreach (var match in regex.EnumerateMatches(piece.Span))
        {
            if (match.Length == 0) continue; // `tokenizers` drops empty pieces
            if (match.Index > last) output.Add(piece.Slice(last, match.Index - last));
            output.Add(piece.Slice(match.Index, match.Length));
            last = match.Index + match.Length;
        }
        if (last < piece.Length) output.Add(piece.Slice(last));
    }

    internal sealed record ByteLevelStep(bool AddPrefixSpace, bool TrimOffsets, bool UseRegex) : PreTokenizerStep
    {
        public override void Split(ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output)
        {
            // `tokenizers` adds the prefix space to every piece that reaches this step, not once per text.
            if (AddPrefixSpace && (piece.Length == 0 || piece.Span[0] != ' ')) piece = (" " + piece.ToString()).AsMemory();
            // The hand-written scanner cuts where Gpt2Regex would, at a fraction of the cost per piece.
            if (UseRegex) Gpt2Splitter.Split(piece, output);
            else if (piece.Length > 0) output.Add(piece);
        }

        public override void WriteJson(Utf8JsonWriter writer)
        {
            writer.WriteStartObject();
            writer.WriteString("type", "ByteLevel");
            writer.WriteBoolean("add_prefix_space", AddPrefixSpace);
            writer.WriteBoolean("trim_offsets", TrimOffsets);
            writer.WriteBoolean("use_regex", UseRegex);
            writer.WriteEndObject();
        }
    }

    /// <summary>`tokenizers`' Digits: numeric chars (char::is_numeric, i.e. Nd/Nl/No) split off, one by one or as runs.</summary>
    internal sealed record DigitsStep(bool IndividualDigits) : PreTokenizerStep
    {
        public override void Split(ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output)
        {
            var span = piece.Span;
            int start = 0;
            for (int i = 0; i < span.Length; i++)
            {
                if (!char.IsNumber(span[i])) continue;
                if (i > start) output.Add(piece.Slice(start, i - start));
                int end = i + 1;
                if (!IndividualDigits) while (end < span.Length && char.IsNumber(span[end])) end++;
                output.Add(piece.Slice(i, end - i));
                start = end;
                i = end - 1;
            }
            if (start < span.Length) output.Add(piece.Slice(start));
        }

        public override void WriteJson(Utf8JsonWriter writer)
        {
            writer.WriteStartObject();
            writer.WriteString("type", "Digits");
            writer.WriteBoolean("individual_digits", IndividualDigits);
            writer.WriteEndObject();
        }
    }

    /// <summary>`tokenizers`' Split with behavior Isolated or Removed and invert = false (what DeepSeek-V3 uses).</summary>
    internal sealed record SplitStep : PreTokenizerStep
    {
        private readonly string _pattern;
        private readonly bool _isRegex;
        private readonly string _behavior;
        private readonly Regex _regex;

        private SplitStep(string pattern, bool isRegex, string behavior)
        {
            _pattern = pattern;
            _isRegex = isRegex;
            _behavior = behavior;
            _regex = new Regex(isRegex ? pattern : Regex.Escape(pattern), RegexOptions.Compiled | RegexOptions.CultureInvariant);
        }

        public static SplitStep FromJson(JsonElement element, string source)
        {
            if (!element.TryGetProperty("pattern", out var pattern) || pattern.ValueKind != JsonValueKind.Object)
                throw new TokenizerFormatException(source, "pre_tokenizer Split has no \"pattern\" object");
            bool isRegex;
            string? text;
            if (pattern.TryGetProperty("Regex", out var regex)) { isRegex = true; text = regex.GetString(); }
            else if (pattern.TryGetProperty("String", out var literal)) { isRegex = false; text = literal.GetString(); }
            else throw new TokenizerFormatException(source, "pre_tokenizer Split pattern must be {\"Regex\": ...} or {\"String\": ...}");
            if (string.IsNullOrEmpty(text))
                throw new TokenizerFormatException(source, "pre_tokenizer Split has an empty pattern");
            string behavior = element.TryGetProperty("behavior", out var b) ? b.GetString() ?? "" : "";
            if (behavior is not ("Isolated" or "Removed"))
                throw new TokenizerFormatException(source, $"unsupported pre_tokenizer Split behavior \"{behavior}\" (supported: Isolated, Removed)");
            if (TokenizerJsonReader.GetBool(element, "invert", false))
                throw new TokenizerFormatException(source, "unsupported pre_tokenizer Split with invert = true");
            try
            {
                return new SplitStep(text, isRegex, behavior);
            }
            catch (ArgumentException e)
            {
                throw new TokenizerFormatException(source, $"pre_tokenizer Split regex does not compile on .NET: {e.Message}", e);
            }
        }

        public override void Split(ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output)
        {
            if (_behavior == "Isolated") SplitIsolated(_regex, piece, output);
            else SplitRemoved(piece, output);
        }

        private void SplitRemoved(ReadOnlyMemory<char> piece, List<ReadOnlyMemory<char>> output)
        {
            int last = 0;
            foreach (var match in _regex.EnumerateMatches(piece.Span))
            {
                if (match.Index > last) output.Add(piece.Slice(last, match.Index - last));
                last = match.Index + match.Length;
            }
            if (last < piece.Length) output.Add(piece.Slice(last));
        }

        public override void WriteJson(Utf8JsonWriter writer)
        {
            writer.WriteStartObject();
            writer.WriteString("type", "Split");
            writer.WriteStartObject("pattern");
            writer.WriteString(_isRegex ? "Regex" : "String", _pattern);
            writer.WriteEndObject();
            writer.WriteString("behavior", _behavior);
            writer.WriteBoolean("invert", false);
            writer.WriteEndObject();
        }
    }
}
