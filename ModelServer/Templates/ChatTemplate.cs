// A model folder's chat template, as Hugging Face's apply_chat_template finds and runs it: chat_template.jinja, else
// tokenizer_config.json's "chat_template" (a string, or named templates of which "default" is used), rendered with
// messages, add_generation_prompt, the special tokens of tokenizer_config.json, tools = None and documents = None.
using System.Text.Json;

namespace DeepSeekCluster.ModelServer.Templates;

public sealed class ChatTemplate
{
    public const string ConfigFile = "tokenizer_config.json";
    public const string JinjaFile = "chat_template.jinja";
    static readonly string[] SpecialTokens = ["bos_token", "eos_token", "unk_token", "pad_token"];

    readonly IReadOnlyList<Node> template;
    readonly Dictionary<string, object?> tokens;

    ChatTemplate(IReadOnlyList<Node> template, Dictionary<string, object?> tokens, string source)
    {
        this.template = template; this.tokens = tokens; Source = source;
    }

    /// <summary>Where the template came from (a file, and the JSON key when it is tokenizer_config.json's).</summary>
    public string Source { get; }

    /// <summary>The folder's template, or null when it has none; a template outside the supported subset throws here, at load.</summary>
    public static ChatTemplate? Load(string folder)
    {
        string configPath = Path.Combine(folder, ConfigFile), jinjaPath = Path.Combine(folder, JinjaFile);
        JsonElement config = default;
        if (File.Exists(configPath))
        {
            try { config = JsonDocument.Parse(File.ReadAllText(configPath)).RootElement; }
            catch (JsonException e) { throw new InvalidDataException($"{configPath} is not valid JSON: {e.Message}", e); }
            if (config.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{configPath} must hold a JSON object");
        }
        string? text = null, source = null;
        if (File.Exists(jinjaPath)) (text, source) = (File.ReadAllText(jinjaPath), jinjaPath);
        else if (config.ValueKind == JsonValueKind.Object && config.TryGetProperty("chat_template", out var t) && t.ValueKind != JsonValueKind.Null)
            (text, source) = (FromConfig(t, configPath), $"{configPath} (\"chat_template\")");
        if (text is null) return null;

        var tokens = new Dictionary<string, object?>();
        foreach (var name in SpecialTokens)
            if (config.ValueKind == JsonValueKind.Object && config.TryGetProperty(name, out var token) && token.ValueKind != JsonValueKind.Null)
                tokens[name] = token.ValueKind switch
                {
                    JsonValueKind.String => token.GetString(),
                    // transformers writes added tokens as {"__type": "AddedToken", "content": "...", ...}
                    JsonValueKind.Object when token.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
                    _ => throw new InvalidDataException($"{configPath}: \"{name}\" must be a string or an object with a string \"content\""),
                };
        return new ChatTemplate(TemplateParser.Parse(text, source!), tokens, source!);
    }

    static string FromConfig(JsonElement t, string configPath)
    {
        if (t.ValueKind == JsonValueKind.String) return t.GetString()!;
        if (t.ValueKind == JsonValueKind.Array)
        {
            var named = new List<string>();
            foreach (var entry in t.EnumerateArray())
            {
                if (entry.ValueKind != JsonValueKind.Object || !entry.TryGetProperty("name", out var n) || n.ValueKind != JsonValueKind.String
                    || !entry.TryGetProperty("template", out var body) || body.ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{configPath}: \"chat_template\" as a list must hold {{\"name\", \"template\"}} objects");
                if (n.GetString() == "default") return body.GetString()!;
                named.Add(n.GetString()!);
            }
            throw new InvalidDataException($"{configPath}: \"chat_template\" names templates {string.Join(", ", named)} but none \"default\", the one chat requests use");
        }
        throw new InvalidDataException($"{configPath}: \"chat_template\" must be a string or a list of named templates");
    }

    /// <summary>The prompt text for these messages (content null is None to the template); <see cref="TemplateRuntimeException"/> when the template refuses them.</summary>
    public string Render(IEnumerable<(string Role, string? Content)> messages, bool addGenerationPrompt = true) =>
        Render(messages.Select(m => (object?)TemplateValues.ToDict([("role", m.Role), ("content", m.Content)])).ToList(), addGenerationPrompt);

    /// <summary>Messages as any template values (tool calls included), as transformers passes its message dicts.</summary>
    public string Render(List<object?> messages, bool addGenerationPrompt)
    {
        var variables = new Dictionary<string, object?>(tokens)
        {
            ["messages"] = messages,
            ["add_generation_prompt"] = addGenerationPrompt,
            ["tools"] = null,
            ["documents"] = null,
        };
        return TemplateRenderer.Render(template, variables);
    }
}
