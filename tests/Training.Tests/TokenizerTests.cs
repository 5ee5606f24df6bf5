// Tests of the byte-level BPE tokenizer: losslessness, training, tokenizer.json compatibility, hand-derived goldens.
using System.Runtime.CompilerServices;
using System.Text;
using DeepSeekCluster.Text.Tokenization;
using BpeTokenizer = DeepSeekCluster.Text.Tokenization.BpeTokenizer;
using CodeGenTokenizer = Microsoft.ML.Tokenizers.CodeGenTokenizer;

namespace DeepSeekCluster.Training.Tests;

public sealed class TokenizerTests
{
    // Trained once for the whole class: a 600-id vocab over a small seeded pseudo-English corpus.
    private static readonly Lazy<BpeTokenizer> Trained = new(() => BpeTokenizer.Train(Corpus(seed: 1, documents: 400), 600));

    // ---- Losslessness ----

    [Theory]
    [InlineData("")]
    [InlineData("Hello, world! It's 2024; we've   got  tabs\tand\nnewlines\r\n  ")]
    [InlineData("In the beginning God created the heaven and the earth.")]
    [InlineData("    leading and trailing spaces    ")]
    public void AsciiTextRoundTrips(string text)
    {
        var tokenizer = Trained.Value;
        Assert.Equal(text, tokenizer.Decode(tokenizer.Encode(text)));
    }

    [Theory]
    [InlineData("日本語のテキストと中文文本")]
    [InlineData("emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷")]
    [InlineData("combining: e\u0301 a\u0308\u0323 Z\u0335\u0321\u0353a")]
    [InlineData("Ελληνικά, русский, عربى, हिन्दी, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀")]
    public void UnicodeTextRoundTrips(string text)
    {
        var tokenizer = Trained.Value;
        int[] ids = tokenizer.Encode(text);
        Assert.Equal(text, tokenizer.Decode(ids));
        Assert.Equal(Encoding.UTF8.GetBytes(text), tokenizer.DecodeBytes(ids));
    }

    [Fact]
    public void RandomWellFormedStringsRoundTrip()
    {
        var tokenizer = Trained.Value;
        var random = new Random(7);
        for (int trial = 0; trial < 300; trial++)
        {
            var builder = new StringBuilder();
            int length = random.Next(0, 40);
            for (int i = 0; i < length; i++)
            {
                // Mix ASCII, BMP and astral code points; skip the surrogate range, which has no UTF-8 form.
                int codePoint = random.Next(4) switch
                {
                    0 => random.Next(0, 128),
                    1 => random.Next(128, 0xD800),
                    2 => random.Next(0xE000, 0x10000),
                    _ => random.Next(0x10000, 0x110000),
                };
                builder.Append(char.ConvertFromUtf32(codePoint));
            }
            string text = builder.ToString();
            Assert.Equal(text, tokenizer.Decode(tokenizer.Encode(text)));
        }
    }

    [Fact]
    public void RandomByteArraysIncludingInvalidUtf8RoundTrip()
    {
        var tokenizer = Trained.Value;
        var random = new Random(11);
        byte[][] fixedCases =
        [
            [0xFF, 0xFE, 0xFD],
            [0xC3],                         // truncated two-byte sequence
            [0xE2, 0x82],                   // truncated three-byte sequence
            [0xED, 0xA0, 0x80],             // encoded surrogate (invalid)
            [0xC0, 0xAF],                   // overlong '/'
            [(byte)'a', 0x80, (byte)'b', 0xF0, 0x9F, 0x98, 0x80, 0xF8],
            [],
        ];
        foreach (var bytes in fixedCases)
        {
            Assert.Equal(bytes, tokenizer.DecodeBytes(tokenizer.EncodeBytes(bytes)));
        }
        bool sawInvalid = false;
        for (int trial = 0; trial < 300; trial++)
        {
            var bytes = new byte[random.Next(0, 64)];
            random.NextBytes(bytes);
            sawInvalid |= !Utf8IsValid(bytes);
            Assert.Equal(bytes, tokenizer.DecodeBytes(tokenizer.EncodeBytes(bytes)));
        }
        Assert.True(sawInvalid, "the random cases should include invalid UTF-8");
    }

    [Fact]
    public void EncodeBytesOfValidUtf8MatchesEncodeOfTheText()
    {
        var tokenizer = Trained.Value;
        const string text = "And God said, Let there be light: and there was light. 光 😀";
        Assert.Equal(tokenizer.Encode(text), tokenizer.EncodeBytes(Encoding.UTF8.GetBytes(text)));
    }

    // ---- Training ----

    [Fact]
    public void TrainingTwiceGivesTheSameJson()
    {
        var first = BpeTokenizer.Train(Corpus(seed: 3, documents: 200), 500);
        var second = BpeTokenizer.Train(Corpus(seed: 3, documents: 200), 500);
        Assert.Equal(first.ToJson(), second.ToJson());
        Assert.Equal(first.Hash, second.Hash);
        // A different corpus must give a different tokenizer, or the comparison above proves nothing.
        Assert.NotEqual(first.Hash, BpeTokenizer.Train(Corpus(seed: 4, documents: 200), 500).Hash);
    }

    [Theory]
    [InlineData(259)]
    [InlineData(300)]
    [InlineData(777)]
    public void TrainedVocabSizeIsExact(int vocabSize)
    {
        var tokenizer = BpeTokenizer.Train(Corpus(seed: 5, documents: 300), vocabSize);
        Assert.Equal(vocabSize, tokenizer.VocabSize);
        Assert.NotNull(tokenizer.IdToToken(vocabSize - 1));
        Assert.Null(tokenizer.IdToToken(vocabSize));
    }

    /// <summary>
    /// The incremental pair counts must give the merges a from-scratch recount gives: this reference recounts
    /// every pair before every merge (slow, obviously right) with the same tie-break.
    /// </summary>
    [Fact]
    public void TrainingMergesEqualANaiveRecountEveryMergeTrainer()
    {
        var documents = Corpus(seed: 13, documents: 60).ToList();
        const int vocabSize = 420;
        var trained = BpeTokenizer.Train(documents, vocabSize);
        using var json = System.Text.Json.JsonDocument.Parse(trained.ToJson());
        var merges = json.RootElement.GetProperty("model").GetProperty("merges").EnumerateArray().Select(m => m.GetString()!).ToList();

        var regex = new System.Text.RegularExpressions.Regex(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+");
        var words = documents.SelectMany(d => regex.Matches(d).Select(m => m.Value))
            .GroupBy(w => w)
            .Select(g => (Symbols: Encoding.UTF8.GetBytes(g.Key).Select(b => ByteLevelAlphabet.ByteToChar(b).ToString()).ToList(), Count: g.Count()))
            .ToList();
        var vocab = new HashSet<string>(Enumerable.Range(0, 256).Select(b => ByteLevelAlphabet.ByteToChar((byte)b).ToString()));
        var expected = new List<string>();
        while (vocab.Count + 3 < vocabSize)
        {
            var pairs = new Dictionary<(string, string), long>();
            foreach (var (symbols, count) in words)
                for (int i = 0; i + 1 < symbols.Count; i++)
                    pairs[(symbols[i], symbols[i + 1])] = pairs.GetValueOrDefault((symbols[i], symbols[i + 1])) + count;
            var best = pairs.OrderByDescending(p => p.Value)
                .ThenBy(p => p.Key.Item1, StringComparer.Ordinal).ThenBy(p => p.Key.Item2, StringComparer.Ordinal).First().Key;
            expected.Add(best.Item1 + " " + best.Item2);
            vocab.Add(best.Item1 + best.Item2);
            foreach (var (symbols, _) in words)
            {
                for (int i = 0; i + 1 < symbols.Count; i++)
                {
                    if (symbols[i] != best.Item1 || symbols[i + 1] != best.Item2) continue;
                    symbols[i] += symbols[i + 1];
                    symbols.RemoveAt(i + 1);
                }
            }
        }
        Assert.Equal(expected, merges);
    }

    [Fact]
    public void SpecialTokensHaveTheFirstIds()
    {
        var tokenizer = Trained.Value;
        Assert.Equal(0, tokenizer.TokenToId("<|begin_of_text|>"));
        Assert.Equal(1, tokenizer.TokenToId("<|end_of_text|>"));
        Assert.Equal(2, tokenizer.TokenToId("<|pad|>"));
        Assert.Equal(0, tokenizer.BosTokenId);
        Assert.Equal(1, tokenizer.EosTokenId);
        Assert.Equal([0, 1], tokenizer.Encode("<|begin_of_text|><|end_of_text|>"));
        Assert.Equal([0], tokenizer.Encode("", addSpecialTokens: true));
    }

    [Fact]
    public void TrainingLearnsFrequentWordsAsSingleTokens()
    {
        var tokenizer = Trained.Value;
        Assert.Single(tokenizer.Encode(" the"));
        Assert.True(tokenizer.Encode("the people of the land").Length < "the people of the land".Length / 2);
    }

    [Fact]
    public void TooSmallVocabSizeIsRejected()
    {
        var error = Assert.Throws<ArgumentOutOfRangeException>(() => BpeTokenizer.Train(["abc"], 258));
        Assert.Contains("259", error.Message);
    }

    // ---- tokenizer.json ----

    [Fact]
    public void SaveAndLoadGiveIdenticalEncodings()
    {
        var tokenizer = Trained.Value;
        string path = Path.Combine(Path.GetTempPath(), $"tokenizer-{Guid.NewGuid():N}.json");
        try
        {
            tokenizer.Save(path);
            var loaded = BpeTokenizer.Load(path);
            foreach (var document in Corpus(seed: 9, documents: 50).Append("日本語 😀 <|end_of_text|> 12345"))
            {
                Assert.Equal(tokenizer.Encode(document, addSpecialTokens: true), loaded.Encode(document, addSpecialTokens: true));
            }
            Assert.Equal(tokenizer.Hash, loaded.Hash);
            Assert.Equal(tokenizer.VocabSize, loaded.VocabSize);
            Assert.Equal(tokenizer.EosTokenId, loaded.EosTokenId);
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>
    /// tiny-bytelevel.json, merges by rank: 0 "l l", 1 "h e", 2 "ll o", 3 "he llo", 4 "Ġ w", 5 "o r", 6 "Ġw or",
    /// 7 "l d", 8 "Ġwor ld"; ids: h1 e2 l3 o4 Ġ5 w6 r7 d8 he9 ll10 llo11 hello12 Ġw13 or14 Ġwor15 ld16 Ġworld17
    /// Ġhello18 (in the vocab, but no merge reaches it). Derivations (lowest rank first, leftmost on ties):
    ///   "hello"  h e l l o → (l l)0 → h e ll o → (h e)1 → he ll o → (ll o)2 → he llo → (he llo)3 → hello = [12]
    ///   " world" Ġ w o r l d → (Ġ w)4 → Ġw o r l d → (o r)5 → Ġw or l d → (Ġw or)6 → Ġwor l d → (l d)7
    ///            → Ġwor ld → (Ġwor ld)8 → Ġworld = [17]
    ///   "llll"   (l l)0 at 0 and 1 and 2: leftmost first → ll l l → (l l)0 at 2 → ll ll = [10, 10]
    ///   "lll"    → ll l; (ll l) has no merge = [10, 3]
    ///   "ello"   e l l o → (l l)0 → e ll o → (ll o)2 → e llo; (e llo) none = [2, 11]
    ///   " hello" Ġ h e l l o → ... → Ġ hello; (Ġ hello) has no merge = [5, 12]
    ///   "hello<s> world": the added token "<s>" is cut out first = [12, 0, 17]
    /// </summary>
    [Theory]
    [InlineData("tiny-bytelevel.json")]
    [InlineData("tiny-bytelevel-array-merges.json")]
    public void TinyFixtureEncodesToHandDerivedIds(string fixture)
    {
        var tokenizer = BpeTokenizer.Load(Fixture(fixture));
        Assert.Equal([12, 17], tokenizer.Encode("hello world"));
        Assert.Equal([10, 10], tokenizer.Encode("llll"));
        Assert.Equal([10, 3], tokenizer.Encode("lll"));
        Assert.Equal([2, 11], tokenizer.Encode("ello"));
        Assert.Equal([12, 5, 12], tokenizer.Encode("hello hello"));
        Assert.Equal([12, 0, 17], tokenizer.Encode("hello<s> world"));
        // Pieces longer than 48 bytes take the heap path; the order of merges must not change.
        Assert.Equal(Enumerable.Repeat(10, 50).Append(3), tokenizer.Encode(new string('l', 101)));
        Assert.Equal(Enumerable.Repeat(12, 20), tokenizer.Encode(string.Concat(Enumerable.Repeat("hello", 20))));
        Assert.Equal("hello<s> world", tokenizer.Decode([12, 0, 17]));
        Assert.Equal("hello world", tokenizer.Decode([12, 0, 17], skipSpecialTokens: true));
    }

    [Fact]
    public void MergesAsStringsAndAsArraysLoadTheSameTokenizer()
    {
        var strings = BpeTokenizer.Load(Fixture("tiny-bytelevel.json"));
        var arrays = BpeTokenizer.Load(Fixture("tiny-bytelevel-array-merges.json"));
        Assert.Equal(strings.ToJson(), arrays.ToJson());
    }

    [Fact]
    public void TemplateProcessingAddsBos()
    {
        var tokenizer = BpeTokenizer.Load(Fixture("tiny-bytelevel.json"));
        Assert.Equal(0, tokenizer.BosTokenId);
        Assert.Equal([0, 12, 17], tokenizer.Encode("hello world", addSpecialTokens: true));
        Assert.Equal([12, 17], tokenizer.Encode("hello world", addSpecialTokens: false));
    }

    /// <summary>With ignore_merges, a pre-token that is itself in the vocab is taken whole: " hello" = Ġhello = [18].</summary>
    [Fact]
    public void IgnoreMergesTakesWholePreTokensFromTheVocab()
    {
        string json = File.ReadAllText(Fixture("tiny-bytelevel.json")).Replace("\"ignore_merges\": false", "\"ignore_merges\": true");
        var tokenizer = BpeTokenizer.FromJson(json, "tiny-bytelevel.json with ignore_merges");
        Assert.Equal([12, 18], tokenizer.Encode("hello hello"));
        Assert.Contains("\"ignore_merges\": true", tokenizer.ToJson());
    }

    /// <summary>
    /// tiny-sequence-split.json (DeepSeek-V3's shape): Split \p{N}{1,3} Isolated, then ByteLevel without regex.
    /// Merges by rank: 0 "3 4", 1 "a b", 2 "ab Ġ", 3 "1 2", 4 "12 3", 5 "4 5"; ids: a1 b2 Ġ3 1→4 2→5 3→6 4→7 5→8
    /// 34→9 ab10 abĠ11 12→12 123→13 45→14; added: 0 = &lt;｜begin▁of▁sentence｜&gt; (BOS), 15 = &lt;｜end▁of▁sentence｜&gt;.
    ///   "ab 12345" → pieces "ab ", "123", "45" (digits in threes). "abĠ": (a b)1 → ab Ġ → (ab Ġ)2 → [11];
    ///   "123": (1 2)3 → 12 3 → (12 3)4 → [13]; "45": (4 5)5 → [14]. "34" never forms: 3 and 4 are in different pieces.
    ///   "345" → one piece: (3 4)0 beats nothing else → 34 5; (34 5) none → [9, 8].
    ///   " 7" → "Ġ" and "7" ("7" is not in the vocab and there is no unk: dropped, as `tokenizers` does) → [3]
    /// </summary>
    [Fact]
    public void SequenceOfSplitAndByteLevelEncodesToHandDerivedIds()
    {
        var tokenizer = BpeTokenizer.Load(Fixture("tiny-sequence-split.json"));
        Assert.Equal([11, 13, 14], tokenizer.Encode("ab 12345"));
        Assert.Equal([9, 8], tokenizer.Encode("345"));
        Assert.Equal([3], tokenizer.Encode(" 7"));
        Assert.Equal([0, 11, 13, 14], tokenizer.Encode("ab 12345", addSpecialTokens: true));
        Assert.Equal(0, tokenizer.BosTokenId);
        Assert.Equal(15, tokenizer.EosTokenId);
        Assert.Equal([0, 9, 8, 15], tokenizer.Encode("<｜begin▁of▁sentence｜>345<｜end▁of▁sentence｜>"));
        Assert.Equal("<｜begin▁of▁sentence｜>ab 12345", tokenizer.Decode([0, 11, 13, 14]));
        Assert.Equal(16, tokenizer.VocabSize);
    }

    /// <summary>Digits(individual_digits) instead of the Split: "12345" → five pieces → [4, 5, 6, 7, 8]; "ab1" → "ab", "1" → [10, 4].</summary>
    [Fact]
    public void DigitsPreTokenizerIsolatesEachDigit()
    {
        string json = File.ReadAllText(Fixture("tiny-sequence-split.json")).Replace(
            "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\p{N}{1,3}\"}, \"behavior\": \"Isolated\", \"invert\": false}",
            "{\"type\": \"Digits\", \"individual_digits\": true}");
        Assert.Contains("Digits", json);
        var tokenizer = BpeTokenizer.FromJson(json, "tiny-sequence-split.json with Digits");
        Assert.Equal([4, 5, 6, 7, 8], tokenizer.Encode("12345"));
        Assert.Equal([10, 4], tokenizer.Encode("ab1"));
    }

    /// <summary>
    /// NFC runs before pre-tokenization: "he\u0301" becomes "hé" = h C3 A9; 'Ã' (C3) and '©' (A9) are not in the tiny
    /// vocab and there is no unk, so only "h" survives = [1] (without NFC: (h e)1, CC 81 dropped = [9]). Without ICU
    /// (InvariantGlobalization, as this repository builds) NFC cannot run, and loading must say so.
    /// </summary>
    [Fact]
    public void NfcNormalizerIsAppliedOrRefusedButNeverSkipped()
    {
        string json = File.ReadAllText(Fixture("tiny-bytelevel.json"));
        string nfcJson = json.Replace("\"normalizer\": null", "\"normalizer\": {\"type\": \"NFC\"}");
        Assert.Equal([9], BpeTokenizer.FromJson(json, "tiny-bytelevel.json").Encode("he\u0301"));
        bool runtimeNormalizes = "e\u0301".Normalize(NormalizationForm.FormC) == "\u00e9";
        if (runtimeNormalizes)
        {
            Assert.Equal([1], BpeTokenizer.FromJson(nfcJson, "tiny-bytelevel.json with NFC").Encode("he\u0301"));
        }
        else
        {
            var error = Assert.Throws<TokenizerFormatException>(() => BpeTokenizer.FromJson(nfcJson, "tiny-bytelevel.json with NFC"));
            Assert.Contains("NFC", error.Message);
            Assert.Contains("tiny-bytelevel.json with NFC", error.Message);
        }
        string emptySequence = json.Replace("\"normalizer\": null", "\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": []}");
        Assert.Equal([12, 17], BpeTokenizer.FromJson(emptySequence, "empty normalizer sequence").Encode("hello world"));
    }

    /// <summary>
    /// The pre-tokenizer shape of DeepSeek-V3 (digits in threes, CJK runs, then a letters/punctuation regex, then
    /// ByteLevel without regex) must compile on .NET and stay lossless; digit groups never share a token.
    /// </summary>
    [Fact]
    public void DeepSeekStylePreTokenizerCompilesAndRoundTrips()
    {
        const string deepSeekPreTokenizer = """
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
              {"type": "Split", "pattern": {"Regex": "[一-龥぀-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": false},
              {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
              {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"}, "behavior": "Isolated", "invert": false},
              {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
            """;
        string json = Trained.Value.ToJson();
        int start = json.IndexOf("\"pre_tokenizer\"", StringComparison.Ordinal);
        int end = json.IndexOf("\"post_processor\"", StringComparison.Ordinal);
        var tokenizer = BpeTokenizer.FromJson(json[..start] + deepSeekPreTokenizer + json[end..], "deepseek-style");
        foreach (var text in new[] { "The LORD said: \"Go!\"\r\n  12345678 日本語テキスト 😀 it's", "" })
        {
            Assert.Equal(text, tokenizer.Decode(tokenizer.Encode(text)));
        }
        var digits = tokenizer.Encode("1234567");
        Assert.Equal("1234567", tokenizer.Decode(digits));
        Assert.All(digits, id => Assert.True(tokenizer.Decode([id]).Length <= 3));
        Assert.Contains("\\p{N}{1,3}", tokenizer.ToJson());
    }

    [Fact]
    public void AddedTokensAreMatchedLongestFirst()
    {
        var tokenizer = BpeTokenizer.Train(Corpus(seed: 2, documents: 50), 400, ["<|a|>", "<|a|><|b|>", "<|b|>"]);
        Assert.Equal([1], tokenizer.Encode("<|a|><|b|>"));
        Assert.Equal([0, 2], tokenizer.Encode("<|a|> <|b|>").Where(id => id < 3));
        Assert.Null(tokenizer.BosTokenId);
        Assert.Equal("x y", tokenizer.Decode(tokenizer.Encode("x<|a|> y"), skipSpecialTokens: true));
    }

    [Fact]
    public void UnsupportedComponentIsRejectedWithItsTypeAndTheFile()
    {
        string path = Fixture("unsupported-pretokenizer.json");
        var error = Assert.Throws<TokenizerFormatException>(() => BpeTokenizer.Load(path));
        Assert.Contains("Metaspace", error.Message);
        Assert.Contains(path, error.Message);
    }

    [Fact]
    public void CorruptJsonIsRejectedNamingTheFile()
    {
        string path = Fixture("corrupt.json");
        var error = Assert.Throws<TokenizerFormatException>(() => BpeTokenizer.Load(path));
        Assert.Contains(path, error.Message);
        Assert.Contains("JSON", error.Message);
    }

    [Fact]
    public void MergeOutsideTheVocabIsRejectedNamingTheMerge()
    {
        string json = File.ReadAllText(Fixture("tiny-bytelevel.json")).Replace("\"l d\",", "\"l x\",");
        var error = Assert.Throws<TokenizerFormatException>(() => BpeTokenizer.FromJson(json, "edited.json"));
        Assert.Contains("edited.json", error.Message);
        Assert.Contains("merges[7]", error.Message);
    }

    // ---- Independent reference ----

    /// <summary>
    /// Microsoft.ML.Tokenizers' CodeGenTokenizer is GPT-2 byte-level BPE written by other people; given our trained
    /// vocab and merges (as vocab.json / merges.txt) it must produce the same ids on text without special tokens.
    /// Runs of two or more spaces are left out: CodeGen adds its own whitespace-run tokens (ids 50257 and up).
    /// </summary>
    [Fact]
    public void EncodingMatchesMicrosoftMlTokenizersOnTheTrainedVocab()
    {
        var tokenizer = Trained.Value;
        var (vocabJson, mergesTxt) = ToVocabAndMerges(tokenizer);
        using var vocabStream = new MemoryStream(Encoding.UTF8.GetBytes(vocabJson));
        using var mergesStream = new MemoryStream(Encoding.UTF8.GetBytes(mergesTxt));
        var reference = CodeGenTokenizer.Create(vocabStream, mergesStream, addPrefixSpace: false, addBeginOfSentence: false, addEndOfSentence: false);
        foreach (var document in Corpus(seed: 21, documents: 40).Append("It's 3 o'clock; they'll say \"hello\"... ok\n\n")
            .Append(string.Concat(Enumerable.Repeat("thepeopleofthelandbroughtwater", 10)))) // one 300-byte piece
        {
            Assert.Equal(reference.EncodeToIds(document).ToArray(), tokenizer.Encode(document));
        }
    }

    // ---- Helpers ----

    private static string Fixture(string name, [CallerFilePath] string thisFile = "")
        => Path.Combine(Path.GetDirectoryName(thisFile)!, "Goldens", "tokenizer", name);

    private static bool Utf8IsValid(byte[] bytes) => System.Text.Unicode.Utf8.IsValid(bytes);

    private static (string VocabJson, string MergesTxt) ToVocabAndMerges(BpeTokenizer tokenizer)
    {
        using var document = System.Text.Json.JsonDocument.Parse(tokenizer.ToJson());
        var model = document.RootElement.GetProperty("model");
        // CodeGenTokenizer insists on its unknown token "<|endoftext|>"; an extra id that our ids never use.
        string vocab = model.GetProperty("vocab").GetRawText().TrimEnd().TrimEnd('}') + $", \"<|endoftext|>\": {tokenizer.VocabSize}}}";
        var merges = new StringBuilder("#version: 0.2\n");
        foreach (var merge in model.GetProperty("merges").EnumerateArray()) merges.Append(merge.GetString()).Append('\n');
        return (vocab, merges.ToString());
    }

    /// <summary>Seeded pseudo-English: frequent function words, capitals, punctuation, numbers, line breaks.</summary>
    internal static IEnumerable<string> Corpus(int seed, int documents)
    {
        string[] words =
        [
            "the", "the", "the", "and", "and", "of", "of", "to", "in", "that", "he", "shall", "unto", "for", "his",
            "they", "be", "is", "him", "not", "them", "it", "with", "all", "thou", "thy", "was", "which", "my", "said",
            "people", "land", "house", "king", "children", "Lord", "God", "Israel", "son", "man", "day", "earth",
            "came", "went", "brought", "spake", "saying", "behold", "heaven", "water", "light", "darkness", "city",
        ];
        var random = new Random(seed);
        for (int d = 0; d < documents; d++)
        {
            var builder = new StringBuilder();
            int sentences = random.Next(2, 8);
            for (int s = 0; s < sentences; s++)
            {
                int length = random.Next(4, 16);
                for (int w = 0; w < length; w++)
                {
                    string word = words[random.Next(words.Length)];
                    if (w == 0) word = char.ToUpperInvariant(word[0]) + word[1..];
                    builder.Append(word);
                    if (random.Next(12) == 0) builder.Append(random.Next(3) == 0 ? ";" : ",");
                    if (random.Next(20) == 0) builder.Append(' ').Append(random.Next(1, 2000));
                    if (w + 1 < length) builder.Append(' ');
                }
                builder.Append(random.Next(5) == 0 ? "?\n" : ". ");
            }
            yield return builder.ToString();
        }
    }
}
