// The "post_processor" of tokenizer.json: what Encode(addSpecialTokens: true) adds around the ids (e.g. BOS).
using System.Text.Json;

namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Supports TemplateProcessing (its "single" template), ByteLevel (which only trims offsets, so it adds no
/// ids), null, and a Sequence of those; each is applied in order, as `tokenizers` does. The JSON it was read
/// from is kept and written back unchanged, so Save(Load(x)) keeps fields this class does not interpret
/// ("pair", type ids).
/// </summary>
internal sealed class PostProcessor
{
    // One template: null entries stand for the encoded sequence, the others are the special ids to insert.
    private readonly List<List<int[]?>> _templates;

    private PostProcessor(JsonElement? json, List<List<int[]?>> templates)
    {
        Json = json;
        _templates = templates;
    }

    /// <summary>The element to write back as "post_processor" (null writes JSON null).</summary>
    public JsonElement? Json { get; }

    /// <summary>The first id a template puts before the sequence, i.e. the BOS, if any.</summary>
    public int? BosId => _templates.Count > 0 && _templates[0].Count > 0 && _templates[0][0] is { Length: > 0 } first ? first[0] : null;

    public static PostProcessor None() => new(null, []);

    /// <summary>TemplateProcessing that puts <paramref name="bosToken"/> before each sequence (Llama-3 style).</summary>
    public static PostProcessor BosTemplate(string bosToken, int bosId)
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream))
        {
            void Special() { w.WriteStartObject(); w.WriteStartObject("SpecialToken"); w.WriteString("id", bosToken); w.WriteNumber("type_id", 0); w.WriteEndObject(); w.WriteEndObject(); }
            void Sequence(string id, int typeId) { w.WriteStartObject(); w.WriteStartObject("Sequence"); w.WriteString("id", id); w.WriteNumber("type_id", typeId); w.WriteEndObject(); w.WriteEndObject(); }
            w.WriteStartObject();
            w.WriteString("type", "TemplateProcessing");
            w.WriteStartArray("single"); Special(); Sequence("A", 0); w.WriteEndArray();
            w.WriteStartArray("pair"); Special(); Sequence("A", 0); Special(); Sequence("B", 1); w.WriteEndArray();
            w.WriteStartObject("special_tokens");
            w.WriteStartObject(bosToken);
            w.WriteString("id", bosToken);
            w.WriteStartArray("ids"); w.WriteNumberValue(bosId); w.WriteEndArray();
            w.WriteStartArray("tokens"); w.WriteStringValue(bosToken); w.WriteEndArray();
            w.WriteEndObject();
            w.WriteEndObject();
            w.WriteEndObject();
        }
        return FromJson(JsonDocument.Parse(stream.ToArray()).RootElement, "trained tokenizer");
    }

    public static PostProcessor FromJson(JsonElement element, string source)
    {
        if (element.ValueKind == JsonValueKind.Null) return None();
        var templates = new List<List<int[]?>>();
        Collect(element, source, templates);
        return new PostProcessor(element.Clone(), templates);
    }

    private static void Collect(JsonElement element, string source, List<List<int[]?>> templates)
    {
        string type = TokenizerJsonReader.GetType(element, "post_processor", source);
        switch (type)
        {
            case "ByteLevel":
                return;
            case "Sequence":
                if (!element.TryGetProperty("processors", out var list) || list.ValueKind != JsonValueKind.Array)
                    throw new TokenizerFormatException(source, "post_processor of type Sequence has no \"processors\" array");
                foreach (var item in list.EnumerateArray()) Collect(item, source, templates);
                return;
            case "TemplateProcessing":
                templates.Add(ReadSingleTemplate(element, source));
                return;
            default:
                throw new TokenizerFormatException(source, $"unsupported post_processor type \"{type}\" (supported: TemplateProcessing, ByteLevel, Sequence, null)");
        }
    }

    private static List<int[]?> ReadSingleTemplate(JsonElement element, string source)
    {
        if (!element.TryGetProperty("single", out var single) || single.ValueKind != JsonValueKind.Array)
            throw new TokenizerFormatException(source, "post_processor TemplateProcessing has no \"single\" array");
        element.TryGetProperty("special_tokens", out var specials);
        var template = new List<int[]?>();
        foreach (var item in single.EnumerateArray())
        {
            if (item.TryGetProperty("Sequence", out var sequence))
            {
                string? id = sequence.TryGetProperty("id", out var s) ? s.GetString() : null;
                if (id != "A")
                    throw new TokenizerFormatException(source, $"post_processor TemplateProcessing \"single\" refers to sequence \"{id}\"; only \"A\" exists for a single sequence");
                template.Add(null);
            }
            else if (item.TryGetProperty("SpecialToken", out var special))
            {
                string name = special.TryGetProperty("id", out var n) ? n.GetString() ?? "" : "";
                if (specials.ValueKind != JsonValueKind.Object || !specials.TryGetProperty(name, out var entry)
                    || !entry.TryGetProperty("ids", out var ids) || ids.ValueKind != JsonValueKind.Array)
                    throw new TokenizerFormatException(source, $"post_processor TemplateProcessing uses special token \"{name}\" that \"special_tokens\" does not define with \"ids\"");
                template.Add(ids.EnumerateArray().Select(x => x.GetInt32()).ToArray());
            }
            else
            {
                throw new TokenizerFormatException(source, "post_processor TemplateProcessing \"single\" has an item that is neither Sequence nor SpecialToken");
            }
        }
        return template;
    }

    /// <summary>Wraps <paramref name="ids"/> in every template, in order.</summary>
    public int[] Apply(List<int> ids)
    {
        IEnumerable<int> result = ids;
        foreach (var template in _templates)
        {
            var wrapped = new List<int>(ids.Count + 4);
            foreach (var part in template) wrapped.AddRange(part ?? result);
            result = wrapped;
        }
        return result as int[] ?? result.ToArray();
    }
}
