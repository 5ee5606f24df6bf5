// Reading and writing Hugging Face tokenizer.json (format "1.0") for byte-level BPE tokenizers.
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Parses tokenizer.json into the parts BpeTokenizer runs. Every component type that is not implemented
/// exactly is refused with a TokenizerFormatException naming the file and the type: an approximate load
/// would produce different ids than the model was trained with, which is worse than not loading.
/// </summary>
internal static class TokenizerJsonReader
{
    public static BpeTokenizer Read(string json, string source)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json, new JsonDocumentOptions { AllowTrailingCommas = false });
        }
        catch (JsonException e)
        {
            throw new TokenizerFormatException(source, $"not valid JSON ({e.Message})", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new TokenizerFormatException(source, "the top level is not a JSON object");
            foreach (var unsupported in new[] { "truncation", "padding" })
            {
                if (root.TryGetProperty(unsupported, out var value) && value.ValueKind != JsonValueKind.Null)
                    throw new TokenizerFormatException(source, $"\"{unsupported}\" must be null (truncation and padding belong to the data pipeline, not the tokenizer)");
            }

            var model = ReadModel(Required(root, "model", source), source);
            var added = ReadAddedTokens(root, source);
            bool nfc = ReadNormalizer(root, source);
            var preTokenizer = root.TryGetProperty("pre_tokenizer", out var pre) && pre.ValueKind != JsonValueKind.Null
                ? PreTokenizer.FromJson(pre, source)
                : throw new TokenizerFormatException(source, "pre_tokenizer is null; a byte-level BPE tokenizer needs a ByteLevel pre_tokenizer");
            var postProcessor = root.TryGetProperty("post_processor", out var post) ? PostProcessor.FromJson(post, source) : PostProcessor.None();
            var decoder = Required(root, "decoder", source);
            string decoderType = decoder.ValueKind == JsonValueKind.Null ? "null" : GetType(decoder, "decoder", source);
            if (decoderType != "ByteLevel")
                throw new TokenizerFormatException(source, $"unsupported decoder type \"{decoderType}\" (supported: ByteLevel)");
            return new BpeTokenizer(model, added, nfc, preTokenizer, postProcessor, decoder.Clone());
        }
    }

    private static BpeModel ReadModel(JsonElement model, string source)
    {
        string type = model.TryGetProperty("type", out var t) ? t.GetString() ?? "" : "BPE"; // old files omit it
        if (type != "BPE") throw new TokenizerFormatException(source, $"unsupported model type \"{type}\" (supported: BPE)");
        if (model.TryGetProperty("dropout", out var dropout) && dropout.ValueKind == JsonValueKind.Number && dropout.GetDouble() != 0)
            throw new TokenizerFormatException(source, "model.dropout must be null: BPE dropout makes encoding random");
        foreach (var affix in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
        {
            if (model.TryGetProperty(affix, out var value) && value.ValueKind == JsonValueKind.String && value.GetString()!.Length > 0)
                throw new TokenizerFormatException(source, $"model.{affix} is not supported by byte-level BPE (must be null)");
        }
        if (GetBool(model, "byte_fallback", false))
            throw new TokenizerFormatException(source, "model.byte_fallback = true is not supported (byte-level BPE never needs it)");
        string? unk = model.TryGetProperty("unk_token", out var u) && u.ValueKind == JsonValueKind.String ? u.GetString() : null;

        var vocabElement = Required(model, "vocab", source);
        if (vocabElement.ValueKind != JsonValueKind.Object) throw new TokenizerFormatException(source, "model.vocab is not an object");
        var vocab = new Dictionary<string, int>();
        foreach (var entry in vocabElement.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out int id))
                throw new TokenizerFormatException(source, $"model.vocab[\"{entry.Name}\"] is not an integer id");
            vocab[entry.Name] = id;
        }

        var mergesElement = Required(model, "merges", source);
        if (mergesElement.ValueKind != JsonValueKind.Array) throw new TokenizerFormatException(source, "model.merges is not an array");
        var merges = new List<(string, string)>(mergesElement.GetArrayLength());
        int index = 0;
        foreach (var merge in mergesElement.EnumerateArray())
        {
            merges.Add(ReadMerge(merge, index++, source));
        }
        return new BpeModel(vocab, merges, unk, GetBool(model, "fuse_unk", false), GetBool(model, "ignore_merges", false), source);
    }

    /// <summary>A merge is "left right" (tokenizers before 0.20) or ["left", "right"] (0.20 and later).</summary>
    private static (string, string) ReadMerge(JsonElement merge, int index, string source)
    {
        if (merge.ValueKind == JsonValueKind.String)
        {
            var parts = merge.GetString()!.Split(' ');
            if (parts.Length != 2) throw new TokenizerFormatException(source, $"model.merges[{index}] \"{merge.GetString()}\" is not two tokens separated by one space");
            return (parts[0], parts[1]);
        }
        if (merge.ValueKind == JsonValueKind.Array && merge.GetArrayLength() == 2
            && merge[0].ValueKind == JsonValueKind.String && merge[1].ValueKind == JsonValueKind.String)
        {
            return (merge[0].GetString()!, merge[1].GetString()!);
        }
        throw new TokenizerFormatException(source, $"model.merges[{index}] is neither \"a b\" nor [\"a\", \"b\"]");
    }

    private static List<AddedToken> ReadAddedTokens(JsonElement root, string source)
    {
        var result = new List<AddedToken>();
        if (!root.TryGetProperty("added_tokens", out var list) || list.ValueKind == JsonValueKind.Null) return result;
        if (list.ValueKind != JsonValueKind.Array) throw new TokenizerFormatException(source, "added_tokens is not an array");
        var ids = new HashSet<int>();
        foreach (var item in list.EnumerateArray())
        {
            if (!item.TryGetProperty("id", out var idElement) || !idElement.TryGetInt32(out int id)
                || !item.TryGetProperty("content", out var content) || content.ValueKind != JsonValueKind.String || content.GetString()!.Length == 0)
                throw new TokenizerFormatException(source, "an added_tokens entry lacks an integer \"id\" or a non-empty \"content\"");
            if (!ids.Add(id)) throw new TokenizerFormatException(source, $"added_tokens: id {id} appears twice");
            result.Add(new AddedToken(id, content.GetString()!,
                GetBool(item, "single_word", false), GetBool(item, "lstrip", false), GetBool(item, "rstrip", false),
                GetBool(item, "normalized", false), GetBool(item, "special", false)));
        }
        return result;
    }

    /// <summary>True for NFC, false for null; added tokens are matched before normalizing, whatever "normalized" says.</summary>
    private static bool ReadNormalizer(JsonElement root, string source)
    {
        if (!root.TryGetProperty("normalizer", out var normalizer) || normalizer.ValueKind == JsonValueKind.Null) return false;
        string type = GetType(normalizer, "normalizer", source);
        if (type == "Sequence" && normalizer.TryGetProperty("normalizers", out var list)
            && list.ValueKind == JsonValueKind.Array && list.GetArrayLength() == 0)
            return false; // an empty Sequence normalizes nothing
        if (type != "NFC") throw new TokenizerFormatException(source, $"unsupported normalizer type \"{type}\" (supported: null, NFC, empty Sequence)");
        // With InvariantGlobalization (this repository's default) .NET has no ICU and Normalize silently returns
        // non-ASCII text unchanged; encoding would then differ from `tokenizers` without any sign of it.
        if ("e\u0301".Normalize(NormalizationForm.FormC) != "\u00e9")
            throw new TokenizerFormatException(source, "normalizer NFC needs Unicode normalization, which this process lacks (InvariantGlobalization is on, or ICU is missing)");
        return true;
    }

    public static JsonElement Required(JsonElement parent, string name, string source)
    {
        if (!parent.TryGetProperty(name, out var value)) throw new TokenizerFormatException(source, $"missing \"{name}\"");
        return value;
    }

    public static string GetType(JsonElement element, string what, string source)
    {
        if (element.ValueKind != JsonValueKind.Object || !element.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
            throw new TokenizerFormatException(source, $"{what} has no \"type\"");
        return type.GetString()!;
    }

    public static bool GetBool(JsonElement element, string name, bool fallback)
    {
        if (!element.TryGetProperty(name, out var value)) return fallback;
        return value.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => fallback,
        };
    }
}

/// <summary>
/// Writes the canonical tokenizer.json: fixed key order, vocab in id order, two-space indentation and
/// non-ASCII kept as UTF-8 (as `tokenizers` writes it). Merges are written as "a b" strings, which every
/// `tokenizers` version reads; byte-level tokens never contain a space (0x20 is 'Ġ'), so this is unambiguous.
/// The same tokenizer always gives the same bytes, which is what BpeTokenizer.Hash relies on.
/// </summary>
internal static class TokenizerJsonWriter
{
    public static string Write(BpeModel model, IReadOnlyList<AddedToken> added, bool nfc,
        PreTokenizer preTokenizer, PostProcessor postProcessor, JsonElement decoder)
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            w.WriteString("version", "1.0");
            w.WriteNull("truncation");
            w.WriteNull("padding");
            w.WriteStartArray("added_tokens");
            foreach (var token in added)
            {
                w.WriteStartObject();
                w.WriteNumber("id", token.Id);
                w.WriteString("content", token.Content);
                w.WriteBoolean("single_word", token.SingleWord);
                w.WriteBoolean("lstrip", token.LStrip);
                w.WriteBoolean("rstrip", token.RStrip);
                w.WriteBoolean("normalized", token.Normalized);
                w.WriteBoolean("special", token.Special);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            if (nfc)
            {
                w.WriteStartObject("normalizer");
                w.WriteString("type", "NFC");
                w.WriteEndObject();
            }
            else
            {
                w.WriteNull("normalizer");
            }
            w.WritePropertyName("pre_tokenizer");
            preTokenizer.WriteJson(w);
            w.WritePropertyName("post_processor");
            if (postProcessor.Json is JsonElement post) post.WriteTo(w); else w.WriteNullValue();
            w.WritePropertyName("decoder");
            decoder.WriteTo(w);

            w.WriteStartObject("model");
            w.WriteString("type", "BPE");
            w.WriteNull("dropout");
            if (model.UnkToken is string unk) w.WriteString("unk_token", unk); else w.WriteNull("unk_token");
            w.WriteNull("continuing_subword_prefix");
            w.WriteNull("end_of_word_suffix");
            w.WriteBoolean("fuse_unk", model.FuseUnk);
            w.WriteBoolean("byte_fallback", false);
            w.WriteBoolean("ignore_merges", model.IgnoreMerges);
            w.WriteStartObject("vocab");
            foreach (var (token, id) in model.Vocab.OrderBy(kv => kv.Value)) w.WriteNumber(token, id);
            w.WriteEndObject();
            w.WriteStartArray("merges");
            foreach (var (left, right) in model.Merges) w.WriteStringValue(left + " " + right);
            w.WriteEndArray();
            w.WriteEndObject();

            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray());
    }
}
