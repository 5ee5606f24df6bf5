// The BPE model: vocab, ranked merges and the merge loop that turns one pre-token's bytes into ids.
using System.Collections.Concurrent;
using System.Text;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Applies merges exactly as `tokenizers`' BPE model does: a piece starts as one symbol per byte-level char;
/// then, repeatedly, the adjacent pair with the lowest merge rank is merged, the leftmost one when several
/// have that rank, until no adjacent pair has a merge. Short pieces rescan; long ones use a heap keyed by
/// (rank, position), which gives the same order in O(n log n) even for a megabyte without spaces.
///
/// Why not Microsoft.ML.Tokenizers' BpeTokenizer here: its byte-level path (CodeGenTokenizer) brings its own
/// pre-tokenizer and special-token handling, and has no ignore_merges, no Split/Digits chain and no way to
/// encode raw (invalid UTF-8) bytes; matching `tokenizers` exactly needs control of every stage, and the merge
/// loop is a page of code. The library is used in the tests instead, as an independent reference for the
/// GPT-2 byte-level encoding of a vocab we trained.
/// </summary>
internal sealed class BpeModel
{
    // Pieces longer than this are rare and would only bloat the cache.
    private const int MaxCachedPieceLength = 128;
    private const int MaxCacheEntries = 500_000;
    // Up to this many symbols a rescan per merge beats a heap (and needs no allocation).
    private const int SmallPiece = 48;

    private readonly Dictionary<string, int> _tokenToId;
    private readonly string?[] _idToToken;
    private readonly Dictionary<long, int> _pairToRank;
    private readonly int[] _rankToMergedId;
    private readonly (int Left, int Right)[] _merges;
    private readonly int[] _byteToId = new int[256]; // -1 where the byte's char is not in the vocab
    private readonly ConcurrentDictionary<string, int[]> _cache = new();
    private readonly ConcurrentDictionary<string, int[]>.AlternateLookup<ReadOnlySpan<char>> _cacheBySpan;
    private int _cacheAdds; // entries added since the cache was last cleared

    public BpeModel(Dictionary<string, int> vocab, IReadOnlyList<(string Left, string Right)> merges, string? unkToken, bool fuseUnk, bool ignoreMerges, string source)
    {
        _tokenToId = vocab;
        int maxId = vocab.Count == 0 ? -1 : vocab.Values.Max();
        _idToToken = new string?[maxId + 1];
        foreach (var (token, id) in vocab)
        {
            if (id < 0) throw new TokenizerFormatException(source, $"model.vocab: token \"{token}\" has negative id {id}");
            if (_idToToken[id] != null) throw new TokenizerFormatException(source, $"model.vocab: id {id} is used by both \"{_idToToken[id]}\" and \"{token}\"");
            _idToToken[id] = token;
        }

        _pairToRank = new Dictionary<long, int>(merges.Count);
        var mergedIds = new List<int>(merges.Count);
        var mergeIds = new List<(int, int)>(merges.Count);
        for (int rank = 0; rank < merges.Count; rank++)
        {
            var (left, right) = merges[rank];
            if (!vocab.TryGetValue(left, out int l) || !vocab.TryGetValue(right, out int r))
                throw new TokenizerFormatException(source, $"model.merges[{rank}]: \"{left} {right}\" uses a token that is not in the vocab");
            if (!vocab.TryGetValue(left + right, out int merged))
                throw new TokenizerFormatException(source, $"model.merges[{rank}]: the merged token \"{left + right}\" is not in the vocab");
            // A repeated merge keeps its first (best) rank, as a HashMap insert-if-absent would.
            if (_pairToRank.TryAdd(PairKey(l, r), mergedIds.Count))
            {
                mergedIds.Add(merged);
                mergeIds.Add((l, r));
            }
        }
        _rankToMergedId = mergedIds.ToArray();
        _merges = mergeIds.ToArray();

        for (int b = 0; b < 256; b++)
        {
            _byteToId[b] = vocab.TryGetValue(ByteLevelAlphabet.ByteToChar((byte)b).ToString(), out int id) ? id : -1;
        }
        if (unkToken != null)
        {
            if (!vocab.TryGetValue(unkToken, out int unk))
                throw new TokenizerFormatException(source, $"model.unk_token \"{unkToken}\" is not in the vocab");
            UnkId = unk;
        }
        UnkToken = unkToken;
        FuseUnk = fuseUnk;
        IgnoreMerges = ignoreMerges;
        _cacheBySpan = _cache.GetAlternateLookup<ReadOnlySpan<char>>();
    }

    public int? UnkId { get; }
    public string? UnkToken { get; }
    public bool FuseUnk { get; }
    public bool IgnoreMerges { get; }
    public int MaxId => _idToToken.Length - 1;
    public IReadOnlyDictionary<string, int> Vocab => _tokenToId;

    public string? IdToToken(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

    public int? TokenToId(string token) => _tokenToId.TryGetValue(token, out int id) ? id : null;

    /// <summary>The merges in rank order, as token strings.</summary>
    public IEnumerable<(string Left, string Right)> Merges => _merges.Select(m => (_idToToken[m.Left]!, _idToToken[m.Right]!));

    public static long PairKey(int left, int right) => ((long)left << 32) | (uint)right;

    /// <summary>Encodes one pre-token given as text (its UTF-8 bytes are what gets merged).</summary>
    public void EncodePiece(ReadOnlySpan<char> piece, List<int> output)
    {
        bool cacheable = piece.Length <= MaxCachedPieceLength;
        if (cacheable && _cacheBySpan.TryGetValue(piece, out var cached))
        {
            output.AddRange(cached);
            return;
        }
        int byteCount = Encoding.UTF8.GetByteCount(piece);
        byte[] bytes = new byte[byteCount];
        Encoding.UTF8.GetBytes(piece, bytes);
        int before = output.Count;
        EncodeBytesPiece(bytes, output);
        if (cacheable)
        {
            // ConcurrentDictionary.Count takes every one of its locks, which cost more than the merge itself when
            // asked once per new piece; an interlocked counter bounds the cache just as well (approximately, which is all a bound needs).
            if (Interlocked.Increment(ref _cacheAdds) > MaxCacheEntries)
            {
                _cache.Clear();
                Interlocked.Exchange(ref _cacheAdds, 1);
            }
            if (!_cacheBySpan.TryAdd(piece, output.GetRange(before, output.Count - before).ToArray()))
                Interlocked.Decrement(ref _cacheAdds); // another thread cached the same piece first
        }
    }

    /// <summary>Encodes one pre-token given as raw bytes (no cache: used for invalid UTF-8 runs).</summary>
    public void EncodeBytesPiece(ReadOnlySpan<byte> bytes, List<int> output)
    {
        if (bytes.Length == 0) return;
        if (IgnoreMerges && _tokenToId.TryGetValue(ByteLevelAlphabet.BytesToString(bytes), out int whole))
        {
            output.Add(whole);
            return;
        }

        int n = bytes.Length;
        Span<int> symbols = n <= SmallPiece ? stackalloc int[SmallPiece] : new int[n];
        int count = 0;
        for (int i = 0; i < n; i++)
        {
            int id = _byteToId[bytes[i]];
            if (id < 0)
            {
                // `tokenizers` drops an unknown char when there is no unk token, and fuses runs of unk if asked.
                if (UnkId is not int unk) continue;
                if (FuseUnk && count > 0 && symbols[count - 1] == unk) continue;
                id = unk;
            }
            symbols[count++] = id;
        }
        symbols = symbols[..count];
        if (count <= SmallPiece) MergeByScan(ref symbols);
        else symbols = MergeByHeap(symbols.ToArray());
        foreach (int id in symbols) output.Add(id);
    }

    /// <summary>Short pieces (nearly all): rescan for the lowest-rank, leftmost pair; no allocation.</summary>
    private void MergeByScan(ref Span<int> symbols)
    {
        while (symbols.Length > 1)
        {
            int bestRank = int.MaxValue, bestPos = -1;
            for (int i = 0; i + 1 < symbols.Length; i++)
            {
                if (_pairToRank.TryGetValue(PairKey(symbols[i], symbols[i + 1]), out int rank) && rank < bestRank)
                {
                    bestRank = rank;
                    bestPos = i;
                }
            }
            if (bestPos < 0) return;
            symbols[bestPos] = _rankToMergedId[bestRank];
            symbols[(bestPos + 2)..].CopyTo(symbols[(bestPos + 1)..]);
            symbols = symbols[..^1];
        }
    }

    /// <summary>
    /// Long pieces: the same order as MergeByScan in O(n log n). Symbols form a linked list over their initial
    /// positions (a merged symbol keeps its left position), and a heap keyed by (rank, position) yields the
    /// lowest-rank, leftmost pair, which is how `tokenizers` orders its merges.
    /// </summary>
    private int[] MergeByHeap(int[] ids)
    {
        int count = ids.Length;
        int[] prev = new int[count];
        int[] next = new int[count];
        for (int i = 0; i < count; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < count ? i + 1 : -1;
        }

        var heap = new PriorityQueue<int, long>();
        for (int i = 0; i + 1 < count; i++) PushPair(heap, ids, i, i + 1);
        while (heap.TryDequeue(out int pos, out long priority))
        {
            int rank = (int)(priority >> 32);
            int right = next[pos];
            // Stale entries: the symbol was absorbed (ids == -1), or the pair at pos has changed since.
            if (ids[pos] < 0 || right < 0) continue;
            if (!_pairToRank.TryGetValue(PairKey(ids[pos], ids[right]), out int current) || current != rank) continue;

            ids[pos] = _rankToMergedId[rank];
            ids[right] = -1;
            next[pos] = next[right];
            if (next[pos] >= 0) prev[next[pos]] = pos;
            if (prev[pos] >= 0) PushPair(heap, ids, prev[pos], pos);
            if (next[pos] >= 0) PushPair(heap, ids, pos, next[pos]);
        }
        var result = new List<int>(count);
        for (int i = 0; i >= 0 && i < count; i = next[i]) result.Add(ids[i]);
        return result.ToArray();
    }

    private void PushPair(PriorityQueue<int, long> heap, int[] ids, int left, int right)
    {
        if (_pairToRank.TryGetValue(PairKey(ids[left], ids[right]), out int rank))
        {
            heap.Enqueue(left, ((long)rank << 32) | (uint)left);
        }
    }
}
