// The tokenizer as GGUF metadata (llama.cpp's "gpt2" byte-level BPE): tokens, types, merges and special ids, read from tokenizer.json.
using System.Text.Json;
using DeepSeekCluster.Text.Tokenization;

namespace DeepSeekCluster.Training.Export;

public static class GgufTokenizer
{
    // llama_token_type values (llama.cpp's LLAMA_TOKEN_TYPE_*).
    const int Normal = 1, Control = 3, UserDefined = 4, Unused = 5;

    /// <summary>
    /// Adds the tokenizer keys. Ids past the tokenizer's vocabulary up to <paramref name="modelVocabSize"/>
    /// (embedding rows the tokenizer never produces) become unused "[PADn]" tokens, because llama.cpp takes its
    /// vocabulary size from this token list and it must match the embedding's rows.
    /// </summary>
    public static void Add(GgufWriter g, BpeTokenizer tokenizer, int modelVocabSize)
    {
        using var doc = JsonDocument.Parse(tokenizer.ToJson());
        var root = doc.RootElement;
        var model = root.GetProperty("model");

        var tokens = new string?[modelVocabSize];
        var types = new int[modelVocabSize];
        foreach (var entry in model.GetProperty("vocab").EnumerateObject())
        {
            int id = entry.Value.GetInt32();
            tokens[id] = entry.Name;
            types[id] = Normal;
        }
        foreach (var added in tokenizer.AddedTokens)
        {
            tokens[added.Id] = added.Content;
            types[added.Id] = added.Special ? Control : UserDefined;
        }
        for (int id = 0; id < modelVocabSize; id++)
        {
            if (tokens[id] is not null) continue;
            tokens[id] = $"[PAD{id}]";
            types[id] = Unused;
        }

        var merges = new List<string>();
        foreach (var merge in model.GetProperty("merges").EnumerateArray())
            merges.Add(merge.ValueKind == JsonValueKind.String ? merge.GetString()! : $"{merge[0].GetString()} {merge[1].GetString()}");

        g.Add("tokenizer.ggml.model", "gpt2");
        g.Add("tokenizer.ggml.pre", PreTokenizerName(root));
        g.Add("tokenizer.ggml.tokens", tokens!);
        g.Add("tokenizer.ggml.token_type", types);
        g.Add("tokenizer.ggml.merges", merges);
        if (tokenizer.BosTokenId is int bos) g.Add("tokenizer.ggml.bos_token_id", (uint)bos);
        if (tokenizer.EosTokenId is int eos) g.Add("tokenizer.ggml.eos_token_id", (uint)eos);
        if (tokenizer.TokenToId(BpeTokenizer.DefaultSpecialTokens[2]) is int pad) g.Add("tokenizer.ggml.padding_token_id", (uint)pad);
        bool addsBos = root.TryGetProperty("post_processor", out var post) && post.ValueKind != JsonValueKind.Null && tokenizer.BosTokenId is not null;
        g.Add("tokenizer.ggml.add_bos_token", addsBos);
        g.Add("tokenizer.ggml.add_eos_token", false);
    }

    /// <summary>
    /// llama.cpp picks its pre-tokenizer regex by name. "gpt-2" is exactly the ByteLevel(use_regex) split our
    /// tokenizer trains with; any other pre_tokenizer has no llama.cpp twin, so text tokenized by llama.cpp would
    /// differ and the export is refused rather than written subtly wrong.
    /// </summary>
    static string PreTokenizerName(JsonElement root)
    {
        var pre = root.GetProperty("pre_tokenizer");
        bool gpt2 = pre.ValueKind == JsonValueKind.Object
                    && pre.GetProperty("type").GetString() == "ByteLevel"
                    && pre.TryGetProperty("use_regex", out var regex) && regex.GetBoolean()
                    && !(pre.TryGetProperty("add_prefix_space", out var prefix) && prefix.GetBoolean());
        bool normalized = root.TryGetProperty("normalizer", out var norm) && norm.ValueKind != JsonValueKind.Null;
        if (!gpt2 || normalized)
            throw new NotSupportedException($"GGUF cannot express this tokenizer: llama.cpp has the GPT-2 byte-level pre-tokenizer without a normalizer, this one has pre_tokenizer {pre.GetRawText()} and normalizer {(normalized ? norm.GetRawText() : "null")}");
        return "gpt-2";
    }
}
