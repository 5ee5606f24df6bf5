// The project's tokenizer: byte-level BPE that trains, encodes, decodes and reads/writes Hugging Face tokenizer.json.
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Byte-level BPE with Hugging Face `tokenizers` semantics. Encoding runs the same stages in the same order:
/// added tokens are split out of the text first (leftmost-longest), then each remaining segment is normalized
/// (null or NFC; NFC needs ICU, so loading refuses it under InvariantGlobalization), pre-tokenized (Split / Digits / ByteLevel), and each pre-token's UTF-8 bytes are merged by
/// rank and looked up in the vocab.
///
/// Ids of a trained tokenizer: the special tokens first, in the order given (by default
/// 0 = "&lt;|begin_of_text|&gt;" (BOS), 1 = "&lt;|end_of_text|&gt;" (EOS, joins documents), 2 = "&lt;|pad|&gt;"),
/// then the 256 byte symbols in byte order, then one id per merge in merge order.
///
/// Lossless by construction: every byte has a symbol, so Decode(Encode(s)) == s for every well-formed string
/// (a lone surrogate has no UTF-8 form and comes back as U+FFFD), and DecodeBytes(EncodeBytes(b)) == b for every
/// byte sequence, invalid UTF-8 included. Both hold only without a normalizer (NFC changes the text on purpose).
/// Thread-safe: encoding shares only a concurrent cache of pre-token encodings.
/// </summary>
public sealed class BpeTokenizer
{
    /// <summary>The special tokens Train adds when it is given none: BOS, EOS, PAD as ids 0, 1, 2.</summary>
    public static readonly IReadOnlyList<string> DefaultSpecialTokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"];

    // Names by which known tokenizers spell their end-of-text token (ours, DeepSeek-V3, GPT-2, Llama 2).
    private static readonly string[] EosNames = ["<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>"];
    private static readonly string[] BosNames = ["<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<s>"];

    private readonly BpeModel _model;
    private readonly AddedToken[] _added;
    private readonly Dictionary<int, AddedToken> _addedById;
    private readonly Dictionary<string, AddedToken> _addedByContent;
    private readonly AddedTokenMatcher _matcher;
    private readonly bool _nfc;
    private readonly PreTokenizer _preTokenizer;
    private readonly PostProcessor _postProcessor;
    private readonly JsonElement _decoder;
    private readonly byte[]?[] _idToBytes;
    private readonly Lazy<string> _json;
    private readonly Lazy<string> _hash;

    internal BpeTokenizer(BpeModel model, IReadOnlyList<AddedToken> added, bool nfc, PreTokenizer preTokenizer, PostProcessor postProcessor, JsonElement decoder)
    {
        _model = model;
        _added = added.ToArray();
        _addedById = _added.ToDictionary(t => t.Id);
        _addedByContent = _added.GroupBy(t => t.Content).ToDictionary(g => g.Key, g => g.First());
        _matcher = new AddedTokenMatcher(_added);
        _nfc = nfc;
        _preTokenizer = preTokenizer;
        _postProcessor = postProcessor;
        _decoder = decoder;

        VocabSize = Math.Max(model.MaxId, _added.Length == 0 ? -1 : _added.Max(t => t.Id)) + 1;
        _idToBytes = new byte[VocabSize][];
        for (int id = 0; id < VocabSize; id++) _idToBytes[id] = TokenBytes(id);

        BosTokenId = postProcessor.BosId ?? BosNames.Select(TokenToId).FirstOrDefault(id => id != null);
        EosTokenId = EosNames.Select(TokenToId).FirstOrDefault(id => id != null);
        _json = new Lazy<string>(() => TokenizerJsonWriter.Write(_model, _added, _nfc, _preTokenizer, _postProcessor, _decoder));
        _hash = new Lazy<string>(() => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(_json.Value))));
    }

    /// <summary>One more than the largest id (vocab or added token): the embedding table's row count.</summary>
    public int VocabSize { get; }

    /// <summary>The id the post-processor puts first (or a known BOS token's id), if any.</summary>
    public int? BosTokenId { get; }

    /// <summary>The end-of-text token's id, used to join documents when packing, if the tokenizer has one.</summary>
    public int? EosTokenId { get; }

    /// <summary>SHA-256 (lower-case hex) of the canonical tokenizer.json, i.e. of ToJson(); goes into manifests.</summary>
    public string Hash => _hash.Value;

    public IReadOnlyList<AddedToken> AddedTokens => _added;

    // ---- Creation and persistence ----

    /// <summary>Trains a byte-level BPE vocab of exactly <paramref name="vocabSize"/> ids; see BpeTrainer for the algorithm.</summary>
    public static BpeTokenizer Train(IEnumerable<string> documents, int vocabSize, IReadOnlyList<string>? specialTokens = null, IProgress<string>? progress = null)
        => BpeTrainer.Train(documents, vocabSize, specialTokens ?? DefaultSpecialTokens, progress);

    public static BpeTokenizer Load(string tokenizerJsonPath)
    {
        string json;
        try
        {
            json = File.ReadAllText(tokenizerJsonPath, Encoding.UTF8);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new TokenizerFormatException(tokenizerJsonPath, $"cannot read the file ({e.Message})", e);
        }
        return FromJson(json, tokenizerJsonPath);
    }

    /// <summary>Parses tokenizer.json text; <paramref name="source"/> names it in error messages.</summary>
    public static BpeTokenizer FromJson(string json, string source) => TokenizerJsonReader.Read(json, source);

    public void Save(string path) => File.WriteAllText(path, ToJson(), new UTF8Encoding(encoderShouldEmitUTF8Identifier: false));

    public string ToJson() => _json.Value;

    // ---- Encoding ----

    /// <summary>Text to ids; <paramref name="addSpecialTokens"/> applies the post-processor (e.g. prepends BOS).</summary>
    public int[] Encode(string text, bool addSpecialTokens = false)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 4);
        var pieces = new List<ReadOnlyMemory<char>>();
        var scratch = new List<ReadOnlyMemory<char>>();
        if (_matcher.IsEmpty)
        {
            EncodePlain(text.AsMemory(), ids, pieces, scratch);
        }
        else
        {
            var segments = new List<(int Start, int Length, AddedToken? Token)>();
            _matcher.Split(text, segments);
            foreach (var (start, length, token) in segments)
            {
                if (token != null) ids.Add(token.Id);
                else EncodePlain(text.AsMemory(start, length), ids, pieces, scratch);
            }
        }
        return addSpecialTokens ? _postProcessor.Apply(ids) : ids.ToArray();
    }

    /// <summary>
    /// Raw bytes to ids. Valid UTF-8 runs are encoded as text; each run of invalid bytes becomes one pre-token of
    /// its own. Added tokens are NOT recognised here: bytes are data, and data must not be able to inject control
    /// tokens (so for text that contains special-token strings, this differs from Encode).
    /// </summary>
    public int[] EncodeBytes(ReadOnlySpan<byte> bytes)
    {
        var ids = new List<int>(bytes.Length / 3 + 4);
        var pieces = new List<ReadOnlyMemory<char>>();
        var scratch = new List<ReadOnlyMemory<char>>();
        int i = 0;
        while (i < bytes.Length)
        {
            int validEnd = i;
            while (validEnd < bytes.Length && System.Text.Rune.DecodeFromUtf8(bytes[validEnd..], out _, out int used) == System.Buffers.OperationStatus.Done)
                validEnd += used;
            if (validEnd > i) EncodePlain(Encoding.UTF8.GetString(bytes[i..validEnd]).AsMemory(), ids, pieces, scratch);
            int invalidEnd = validEnd;
            while (invalidEnd < bytes.Length && System.Text.Rune.DecodeFromUtf8(bytes[invalidEnd..], out _, out int skip) != System.Buffers.OperationStatus.Done)
                invalidEnd += skip;
            if (invalidEnd > validEnd) _model.EncodeBytesPiece(bytes[validEnd..invalidEnd], ids);
            i = invalidEnd;
        }
        return ids.ToArray();
    }

    private void EncodePlain(ReadOnlyMemory<char> text, List<int> ids, List<ReadOnlyMemory<char>> pieces, List<ReadOnlyMemory<char>> scratch)
    {
        if (_nfc) text = text.ToString().Normalize(NormalizationForm.FormC).AsMemory();
        _preTokenizer.Split(text, pieces, scratch);
        foreach (var piece in pieces) _model.EncodePiece(piece.Span, ids);
    }

    // ---- Decoding ----

    /// <summary>Ids to text (invalid UTF-8 in the decoded bytes becomes U+FFFD, as in `tokenizers`).</summary>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = false)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var kept = skipSpecialTokens ? ids.Where(id => !(_addedById.TryGetValue(id, out var t) && t.Special)) : ids;
        return Encoding.UTF8.GetString(DecodeBytes(kept));
    }

    /// <summary>Ids to the exact bytes they stand for (added tokens as their UTF-8 content).</summary>
    public byte[] DecodeBytes(IEnumerable<int> ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var buffer = new List<byte>();
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)_idToBytes.Length || _idToBytes[id] is not byte[] bytes)
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"token id {id} is not in this tokenizer (vocab size {VocabSize})");
            buffer.AddRange(bytes);
        }
        return buffer.ToArray();
    }

    // `tokenizers`' ByteLevel decoder maps a token's chars back to bytes; a token with any char outside the
    // 256-char alphabet (an added token like "<｜begin▁of▁sentence｜>") is taken as its UTF-8 text instead.
    private byte[]? TokenBytes(int id)
    {
        string? token = IdToToken(id);
        if (token == null) return null;
        if (_addedById.ContainsKey(id)) return Encoding.UTF8.GetBytes(token);
        var bytes = new byte[token.Length];
        for (int i = 0; i < token.Length; i++)
        {
            if (!ByteLevelAlphabet.TryCharToByte(token[i], out bytes[i])) return Encoding.UTF8.GetBytes(token);
        }
        return bytes;
    }

    // ---- Lookup ----

    public int? TokenToId(string token) => _addedByContent.TryGetValue(token, out var added) ? added.Id : _model.TokenToId(token);

    public string? IdToToken(int id) => _addedById.TryGetValue(id, out var added) ? added.Content : _model.IdToToken(id);
}
