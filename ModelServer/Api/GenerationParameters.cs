// The sampling fields OpenAI's completions and chat requests share, read from JSON with OpenAI's names and checks.
using System.Text.Json;

namespace DeepSeekCluster.ModelServer.Api;

public sealed record GenerationParameters
{
    public required string Model { get; init; }
    public int MaxTokens { get; init; } = 16;
    public double Temperature { get; init; } = 1.0;
    public double TopP { get; init; } = 1.0;
    public long Seed { get; init; }
    public IReadOnlyList<string> Stop { get; init; } = [];
    public bool Stream { get; init; }
    public bool IncludeUsage { get; init; }
    /// <summary>-1: none; 0..20: the chosen token's log-probability and this many alternatives.</summary>
    public int Logprobs { get; init; } = -1;
    public string? User { get; init; }
    /// <summary>vLLM's extension: also return the generated token ids.</summary>
    public bool ReturnTokenIds { get; init; }
    /// <summary>OpenAI's logit_bias: added to a token's logit before it is chosen (-100 bans it, 100 forces it).</summary>
    public IReadOnlyDictionary<int, double> LogitBias { get; init; } = new Dictionary<int, double>();

    /// <summary>Reads the shared fields; <paramref name="maxTokensDefault"/> differs (16 for completions, the context for chat).</summary>
    public static GenerationParameters Read(JsonElement body, int maxTokensDefault, Func<JsonElement, int> logprobs)
    {
        if (body.ValueKind != JsonValueKind.Object) throw ApiError.BadRequest("the request body must be a JSON object");
        string model = body.TryGetProperty("model", out var m) && m.ValueKind == JsonValueKind.String && m.GetString() is { Length: > 0 } s
            ? s : throw ApiError.BadRequest("'model' is required: a model id from GET /v1/models", "model");
        int maxTokens = maxTokensDefault;
        foreach (var name in new[] { "max_tokens", "max_completion_tokens" })
            if (Get(body, name) is { } v && v.ValueKind != JsonValueKind.Null)
                maxTokens = v.TryGetInt32(out var n) && n >= 1 ? n : throw ApiError.BadRequest($"'{name}' must be an integer of at least 1, got {v.GetRawText()}", name);
        double temperature = Number(body, "temperature", 1.0, 0, 2);
        double topP = Number(body, "top_p", 1.0, 0, 1);
        if (topP == 0) throw ApiError.BadRequest("'top_p' must be greater than 0 and at most 1, got 0", "top_p");
        if (Get(body, "n") is { ValueKind: not JsonValueKind.Null } nv && !(nv.TryGetInt32(out var nn) && nn == 1))
            throw ApiError.BadRequest($"'n' must be 1 (this server returns one choice per request), got {nv.GetRawText()}", "n");
        long seed = 0;
        if (Get(body, "seed") is { ValueKind: not JsonValueKind.Null } sv)
            seed = sv.TryGetInt64(out var sd) ? sd : throw ApiError.BadRequest($"'seed' must be an integer, got {sv.GetRawText()}", "seed");
        var stop = new List<string>();
        if (Get(body, "stop") is { } st)
        {
            if (st.ValueKind == JsonValueKind.String) stop.Add(st.GetString()!);
            else if (st.ValueKind == JsonValueKind.Array)
                foreach (var e in st.EnumerateArray())
                    stop.Add(e.ValueKind == JsonValueKind.String ? e.GetString()! : throw ApiError.BadRequest("'stop' must be a string or an array of strings", "stop"));
            else if (st.ValueKind != JsonValueKind.Null) throw ApiError.BadRequest("'stop' must be a string or an array of strings", "stop");
            if (stop.Count > 4) throw ApiError.BadRequest($"'stop' may hold at most 4 sequences, got {stop.Count}", "stop");
            if (stop.Any(x => x.Length == 0)) throw ApiError.BadRequest("'stop' sequences must not be empty", "stop");
        }
        bool stream = Bool(body, "stream");
        bool includeUsage = Get(body, "stream_options") is { ValueKind: JsonValueKind.Object } so && Bool(so, "include_usage");
        string? user = Get(body, "user") is { ValueKind: JsonValueKind.String } u ? u.GetString() : null;
        return new GenerationParameters
        {
            Model = model, MaxTokens = maxTokens, Temperature = temperature, TopP = topP, Seed = seed, Stop = stop,
            Stream = stream, IncludeUsage = includeUsage, Logprobs = logprobs(body), User = user, ReturnTokenIds = Bool(body, "return_token_ids"),
            LogitBias = LogitBiasOf(body),
        };
    }

    /// <summary>{"token id": bias} with biases from -100 to 100, as OpenAI takes it; the ids are checked against the model later.</summary>
    static Dictionary<int, double> LogitBiasOf(JsonElement body)
    {
        var bias = new Dictionary<int, double>();
        if (Get(body, "logit_bias") is not { ValueKind: not JsonValueKind.Null } lb) return bias;
        if (lb.ValueKind != JsonValueKind.Object)
            throw ApiError.BadRequest($"'logit_bias' must be an object mapping token ids to biases from -100 to 100, got {lb.GetRawText()}", "logit_bias");
        foreach (var entry in lb.EnumerateObject())
        {
            if (!int.TryParse(entry.Name, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int token))
                throw ApiError.BadRequest($"'logit_bias' keys must be token ids (non-negative integers), got \"{entry.Name}\"", "logit_bias");
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetDouble(out var b) || b < -100 || b > 100)
                throw ApiError.BadRequest($"'logit_bias' for token {token} must be a number from -100 to 100, got {entry.Value.GetRawText()}", "logit_bias");
            bias[token] = b;
        }
        return bias;
    }

    internal static JsonElement? Get(JsonElement body, string name) => body.TryGetProperty(name, out var v) ? v : null;

    internal static bool Bool(JsonElement body, string name) => Get(body, name) switch
    {
        null => false,
        { ValueKind: JsonValueKind.True } => true,
        { ValueKind: JsonValueKind.False or JsonValueKind.Null } => false,
        var v => throw ApiError.BadRequest($"'{name}' must be true or false, got {v.Value.GetRawText()}", name),
    };

    static double Number(JsonElement body, string name, double fallback, double min, double max)
    {
        if (Get(body, name) is not { ValueKind: not JsonValueKind.Null } v) return fallback;
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetDouble(out var d) || d < min || d > max)
            throw ApiError.BadRequest($"'{name}' must be a number from {min} to {max}, got {v.GetRawText()}", name);
        return d;
    }
}
