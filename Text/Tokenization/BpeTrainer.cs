// Trains a byte-level BPE vocabulary from a stream of documents (pair counts with incremental updates).
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// The classic BPE training loop, made fast by never recounting:
///  1. Stream the documents once: split out special tokens, pre-tokenize with ByteLevel (GPT-2 regex) and
///     count each distinct pre-token ("word"). Only the distinct words are kept.
///  2. Count every adjacent symbol pair over the words (weighted by word frequency) and remember which words
///     hold each pair.
///  3. Repeat until the vocab has the requested size: take the most frequent pair, append the merged token,
///     rewrite only the words that hold the pair, and apply their before/after pair-count differences.
/// The best pair comes from a max-heap with lazy deletion: an entry whose count is out of date is re-queued with
/// the current count when it reaches the top, and a pair whose count rises is queued again.
///
/// Tie-break (so training is deterministic, independent of hash order): among pairs with the same count, the
/// one whose (left, right) token strings are smallest, compared ordinally (UTF-16 code units of the
/// byte-level strings) first by left, then by right.
/// </summary>
internal static class BpeTrainer
{
    private const int ProgressEvery = 1000;

    public static BpeTokenizer Train(IEnumerable<string> documents, int vocabSize, IReadOnlyList<string> specialTokens, IProgress<string>? progress)
    {
        ArgumentNullException.ThrowIfNull(documents);
        if (specialTokens.Any(string.IsNullOrEmpty)) throw new ArgumentException("special tokens must be non-empty strings", nameof(specialTokens));
        if (specialTokens.Distinct().Count() != specialTokens.Count) throw new ArgumentException("special tokens must be distinct", nameof(specialTokens));
        int minimum = specialTokens.Count + 256;
        if (vocabSize < minimum)
            throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, $"vocabSize must be at least {minimum} ({specialTokens.Count} special tokens + 256 byte symbols)");

        // ---- Vocab: specials, then the 256 bytes in byte order ----
        var tokens = new List<string>(vocabSize);
        var tokenToId = new Dictionary<string, int>(vocabSize);
        var added = new List<AddedToken>();
        foreach (var special in specialTokens)
        {
            added.Add(new AddedToken(tokens.Count, special, Special: true));
            tokenToId[special] = tokens.Count;
            tokens.Add(special);
        }
        var byteToId = new int[256];
        for (int b = 0; b < 256; b++)
        {
            string symbol = ByteLevelAlphabet.ByteToChar((byte)b).ToString();
            // A special token spelt as one byte symbol would collide; reuse its id rather than duplicate the string.
            if (!tokenToId.TryGetValue(symbol, out byteToId[b]))
            {
                byteToId[b] = tokens.Count;
                tokenToId[symbol] = tokens.Count;
                tokens.Add(symbol);
            }
        }

        // ---- 1. Count pre-tokens ----
        var wordCounts = CountWords(documents, added, progress);
        var words = new List<int[]>(wordCounts.Count);
        var counts = new List<long>(wordCounts.Count);
        foreach (var (word, count) in wordCounts.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            byte[] bytes = Encoding.UTF8.GetBytes(word);
            words.Add(bytes.Select(b => byteToId[b]).ToArray());
            counts.Add(count);
        }
        progress?.Report($"tokenizer: {wordCounts.Count} distinct pre-tokens");

        // ---- 2. Count pairs ----
        var pairCounts = new Dictionary<long, long>();
        var pairWords = new Dictionary<long, List<int>>();
        for (int w = 0; w < words.Count; w++)
        {
            var word = words[w];
            for (int i = 0; i + 1 < word.Length; i++)
            {
                long key = BpeModel.PairKey(word[i], word[i + 1]);
                pairCounts[key] = pairCounts.GetValueOrDefault(key) + counts[w];
                AddWord(pairWords, key, w);
            }
        }
        var comparer = new PairPriorityComparer(tokens);
        var heap = new PriorityQueue<long, (long Count, long Key)>(comparer);
        foreach (var (key, count) in pairCounts) heap.Enqueue(key, (count, key));

        // ---- 3. Merge ----
        var merges = new List<(string, string)>(vocabSize - tokens.Count);
        var delta = new Dictionary<long, long>();
        var visited = new int[words.Count];
        int mergeIndex = 0;
        while (tokens.Count < vocabSize)
        {
            if (!heap.TryDequeue(out long best, out var queued))
                throw new ArgumentException($"the corpus supports at most {tokens.Count} ids (no pairs left to merge); asked for {vocabSize}", nameof(documents));
            long current = pairCounts.GetValueOrDefault(best);
            if (current != queued.Count)
            {
                if (current > 0) heap.Enqueue(best, (current, best));
                continue;
            }
            int left = (int)(best >> 32), right = (int)(uint)best;
            string mergedToken = tokens[left] + tokens[right];
            if (!tokenToId.TryGetValue(mergedToken, out int merged))
            {
                merged = tokens.Count;
                tokenToId[mergedToken] = merged;
                tokens.Add(mergedToken);
            }
            merges.Add((tokens[left], tokens[right]));
            mergeIndex++;

            delta.Clear();
            foreach (int w in pairWords[best])
            {
                if (visited[w] == mergeIndex) continue; // the list may hold a word more than once
                visited[w] = mergeIndex;
                words[w] = MergeWord(words[w], left, right, merged, counts[w], delta, pairWords, w);
            }
            pairWords.Remove(best);
            foreach (var (key, change) in delta)
            {
                if (change == 0) continue;
                long updated = pairCounts.GetValueOrDefault(key) + change;
                if (updated <= 0) pairCounts.Remove(key); else pairCounts[key] = updated;
                if (change > 0) heap.Enqueue(key, (updated, key));
            }
            if (progress != null && mergeIndex % ProgressEvery == 0)
                progress.Report($"tokenizer: merge {mergeIndex}, vocab {tokens.Count}/{vocabSize}: \"{tokens[left]}\" + \"{tokens[right]}\" ({queued.Count})");
        }

        var model = new BpeModel(tokenToId, merges, unkToken: null, fuseUnk: false, ignoreMerges: false, source: "trained tokenizer");
        int? bos = specialTokens.Contains(BpeTokenizer.DefaultSpecialTokens[0]) ? tokenToId[BpeTokenizer.DefaultSpecialTokens[0]] : null;
        var postProcessor = bos is int bosId ? PostProcessor.BosTemplate(BpeTokenizer.DefaultSpecialTokens[0], bosId) : PostProcessor.None();
        return new BpeTokenizer(model, added, nfc: false, PreTokenizer.DefaultByteLevel(), postProcessor, ByteLevelDecoderJson());
    }

    private static Dictionary<string, long> CountWords(IEnumerable<string> documents, List<AddedToken> specials, IProgress<string>? progress)
    {
        var counts = new Dictionary<string, long>();
        var bySpan = counts.GetAlternateLookup<ReadOnlySpan<char>>();
        var matcher = new AddedTokenMatcher(specials);
        var preTokenizer = PreTokenizer.DefaultByteLevel();
        var segments = new List<(int Start, int Length, AddedToken? Token)>();
        var pieces = new List<ReadOnlyMemory<char>>();
        var scratch = new List<ReadOnlyMemory<char>>();
        long documentCount = 0, chars = 0;
        foreach (var document in documents)
        {
            if (document == null) continue;
            // Special-token strings in the corpus are not text to learn merges from.
            matcher.Split(document, segments);
            foreach (var (start, length, token) in segments)
            {
                if (token != null) continue;
                preTokenizer.Split(document.AsMemory(start, length), pieces, scratch);
                foreach (var piece in pieces)
                {
                    bySpan.TryGetValue(piece.Span, out long count);
                    bySpan[piece.Span] = count + 1;
                }
            }
            documentCount++;
            chars += document.Length;
            if (progress != null && documentCount % 100_000 == 0) progress.Report($"tokenizer: read {documentCount} documents, {chars} chars");
        }
        return counts;
    }

    /// <summary>
    /// Merges every non-overlapping (left, right), left to right, in one word; records the word's pair-count
    /// change (times its frequency) in <paramref name="delta"/> and indexes the word under its new pairs.
    /// </summary>
    private static int[] MergeWord(int[] word, int left, int right, int merged, long count,
        Dictionary<long, long> delta, Dictionary<long, List<int>> pairWords, int wordIndex)
    {
        bool found = false;
        for (int i = 0; i + 1 < word.Length; i++)
        {
            if (word[i] == left && word[i + 1] == right) { found = true; break; }
        }
        if (!found) return word;

        for (int i = 0; i + 1 < word.Length; i++)
        {
            long key = BpeModel.PairKey(word[i], word[i + 1]);
            delta[key] = delta.GetValueOrDefault(key) - count;
        }
        var result = new List<int>(word.Length);
        for (int i = 0; i < word.Length; i++)
        {
            if (i + 1 < word.Length && word[i] == left && word[i + 1] == right)
            {
                result.Add(merged);
                i++;
            }
            else
            {
                result.Add(word[i]);
            }
        }
        for (int i = 0; i + 1 < result.Count; i++)
        {
            long key = BpeModel.PairKey(result[i], result[i + 1]);
            delta[key] = delta.GetValueOrDefault(key) + count;
            if (result[i] == merged || result[i + 1] == merged) AddWord(pairWords, key, wordIndex);
        }
        return result.ToArray();
    }

    private static void AddWord(Dictionary<long, List<int>> pairWords, long key, int word)
    {
        if (!pairWords.TryGetValue(key, out var list)) pairWords[key] = list = new List<int>();
        if (list.Count == 0 || list[^1] != word) list.Add(word);
    }

    private static JsonElement ByteLevelDecoderJson()
        => JsonDocument.Parse("""{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true}""").RootElement.Clone();

    /// <summary>Highest count first; ties broken by the smaller (left, right) token strings, ordinally.</summary>
    private sealed class PairPriorityComparer(List<string> tokens) : IComparer<(long Count, long Key)>
    {
        public int Compare((long Count, long Key) x, (long Count, long Key) y)
        {
            if (x.Count != y.Count) return y.Count.CompareTo(x.Count);
            if (x.Key == y.Key) return 0;
            int byLeft = string.CompareOrdinal(tokens[(int)(x.Key >> 32)], tokens[(int)(y.Key >> 32)]);
            return byLeft != 0 ? byLeft : string.CompareOrdinal(tokens[(int)(uint)x.Key], tokens[(int)(uint)y.Key]);
        }
    }
}
