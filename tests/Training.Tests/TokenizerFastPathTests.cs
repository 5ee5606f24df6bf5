// The fast encode path against straightforward references: the hand-written GPT-2 splitter against the regex it
// replaces, and whole encodings against a naive encoder (regex pieces, merges found by rescanning string pairs).
using System.Text;
using System.Text.Json;
using DeepSeekCluster.Text.Tokenization;

namespace DeepSeekCluster.Training.Tests;

public sealed class TokenizerFastPathTests
{
    private static readonly Lazy<BpeTokenizer> Trained = new(() => BpeTokenizer.Train(TokenizerTests.Corpus(seed: 1, documents: 400), 600));

    // Letters, numbers and whitespace of several scripts and categories, contraction parts, punctuation, astral chars.
    private static readonly string[] Alphabet =
    [
        "a", "Z", "s", "t", "r", "e", "v", "l", "m", "d", "S", "T", "L", "é", "ß", "Ω", "ж", "日", "ﬁ", "ʰ", "ǅ",
        "0", "7", "٣", "²", "½", "Ⅻ", "৪",
        " ", " ", " ", "\t", "\n", "\r", "\u000B", "\u000C", "\u00A0", "\u2003", "\u2028", "\u2029", "\u0085", "\u3000",
        "'", "'", "’", "\"", ",", ".", "!", "?", "-", "_", "(", "$", "@", "#", "\u0301", "\u200D", "\u0000", "\u007F",
        "😀", "𝔘", "𠀀", "\uD800", "\uDC00",
    ];

    private static readonly string[] HandPicked =
    [
        "",
        " ",
        "   ",
        "\n",
        "a  b",
        "a \n b",
        "hello   world  ",
        "It's 2024; we've   got  tabs\tand\nnewlines\r\n  ",
        "don't I'll you're we've she'd I'm 'S 'T 'RE 'x ''s '",
        "x'",
        "'ll'll're've",
        " 'sa '  's",
        "1234567890 12 3.14 -5 ²³ Ⅻ ٣٤",
        "Ελληνικά, русский, عربى, हिन्दी, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀 日本語のテキスト",
        "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
        "combining: e\u0301 a\u0308\u0323",
        "\u00A0nbsp\u00A0 \u2003em\u3000ideographic\u2028line",
        "tabs\t\t\tand spaces \t \t mixed\n\n\n\nparagraphs\r\n\r\n",
        "trailing whitespace   ",
        "!!!??? ... --- ___ $$$ @@@ ###",
        "\u0000\u0001 control \u007F",
    ];

    [Fact]
    public void SplitterCutsWhereTheGpt2RegexCuts()
    {
        foreach (string text in HandPicked.Concat(RandomTexts(seed: 3, count: 3000)))
            Assert.Equal(RegexPieces(text), SplitterPieces(text));
    }

    [Fact]
    public void FastEncodingMatchesTheNaiveReferenceEncoder()
    {
        var tokenizer = Trained.Value;
        var reference = new NaiveEncoder(tokenizer);
        var texts = HandPicked
            .Concat(TokenizerTests.Corpus(seed: 9, documents: 60))
            .Concat(RandomTexts(seed: 5, count: 1500))
            .Append(string.Concat(Enumerable.Repeat("thepeopleofthelandbroughtwater", 10))) // one 300-byte piece: the heap path
            .Append(new string('x', 200) + " " + new string(' ', 150) + "end")               // longer than the cache takes
            .ToList();
        // Twice: the first pass fills the piece cache, the second is served from it.
        for (int pass = 0; pass < 2; pass++)
        {
            foreach (string text in texts)
                Assert.Equal(reference.Encode(text), tokenizer.Encode(text));
        }
    }

    [Fact]
    public void TextWithoutAddedTokensAndWithThemIsSplitTheSameAroundThem()
    {
        // The matcher skips ahead to chars that can start an added token; the tokens must still be found anywhere.
        var tokenizer = Trained.Value;
        int eos = tokenizer.EosTokenId!.Value;
        string text = "the land<|end_of_text|>and the <|end_of_text|><|end_of_text|> people <|end_of_tex";
        var reference = new NaiveEncoder(tokenizer);
        int[] expected =
        [
            .. reference.Encode("the land"), eos, .. reference.Encode("and the "), eos, eos, .. reference.Encode(" people <|end_of_tex"),
        ];
        Assert.Equal(expected, tokenizer.Encode(text));
    }

    private static List<string> RegexPieces(string text)
    {
        var pieces = new List<string>();
        foreach (var match in PreTokenizer.Gpt2Regex.EnumerateMatches(text)) pieces.Add(text.Substring(match.Index, match.Length));
        return pieces;
    }

    private static List<string> SplitterPieces(string text)
    {
        var pieces = new List<ReadOnlyMemory<char>>();
        Gpt2Splitter.Split(text.AsMemory(), pieces);
        return pieces.Select(p => p.ToString()).ToList();
    }

    private static IEnumerable<string> RandomTexts(int seed, int count)
    {
        var random = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            var builder = new StringBuilder();
            int length = random.Next(0, 30);
            for (int j = 0; j < length; j++) builder.Append(Alphabet[random.Next(Alphabet.Length)]);
            yield return builder.ToString();
        }
    }

    /// <summary>
    /// Byte-level BPE the slow, obvious way, from tokenizer.json alone: regex pieces, each piece's UTF-8 bytes as
    /// byte-level strings, then repeatedly merge the adjacent pair with the lowest rank (leftmost on ties).
    /// </summary>
    private sealed class NaiveEncoder
    {
        private readonly Dictionary<string, int> _vocab = new(StringComparer.Ordinal);
        private readonly Dictionary<(string, string), int> _ranks = new();

        public NaiveEncoder(BpeTokenizer tokenizer)
        {
            using var json = JsonDocument.Parse(tokenizer.ToJson());
            var model = json.RootElement.GetProperty("model");
            foreach (var entry in model.GetProperty("vocab").EnumerateObject()) _vocab[entry.Name] = entry.Value.GetInt32();
            int rank = 0;
            foreach (var merge in model.GetProperty("merges").EnumerateArray())
            {
                string[] parts = merge.ValueKind == JsonValueKind.Array
                    ? merge.EnumerateArray().Select(p => p.GetString()!).ToArray()
                    : merge.GetString()!.Split(' ');
                _ranks.TryAdd((parts[0], parts[1]), rank++);
            }
        }

        public int[] Encode(string text)
        {
            var ids = new List<int>();
            foreach (string piece in RegexPieces(text))
            {
                var symbols = Encoding.UTF8.GetBytes(piece).Select(b => ByteLevelAlphabet.ByteToChar(b).ToString()).ToList();
                while (true)
                {
                    int best = -1, bestRank = int.MaxValue;
                    for (int i = 0; i + 1 < symbols.Count; i++)
                    {
                        if (_ranks.TryGetValue((symbols[i], symbols[i + 1]), out int r) && r < bestRank)
                        {
                            bestRank = r;
                            best = i;
                        }
                    }
                    if (best < 0) break;
                    symbols[best] += symbols[best + 1];
                    symbols.RemoveAt(best + 1);
                }
                ids.AddRange(symbols.Select(s => _vocab[s]));
            }
            return ids.ToArray();
        }
    }
}
