// /v1/chat/completions: messages rendered by the model folder's chat template (or the default one), the reply streamed as chat.completion.chunk deltas.
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.ModelServer.Templates;
using Microsoft.AspNetCore.Http;

namespace DeepSeekCluster.ModelServer.Api;

public static class ChatRequest
{
    public const int MaxTopLogprobs = 20;

    public static GenerationParameters Parameters(JsonElement body) =>
        GenerationParameters.Read(body, maxTokensDefault: int.MaxValue, body =>
        {
            if (!GenerationParameters.Bool(body, "logprobs")) return -1;
            return GenerationParameters.Get(body, "top_logprobs") switch
            {
                null or { ValueKind: JsonValueKind.Null } => 0,
                var v when v.Value.TryGetInt32(out var n) && n is >= 0 and <= MaxTopLogprobs => n,
                var v => throw ApiError.BadRequest($"'top_logprobs' must be an integer from 0 to {MaxTopLogprobs}, got {v.Value.GetRawText()}", "top_logprobs"),
            };
        });

    /// <summary>
    /// The default chat template (docs/serving.md), for folders without one: for each message "&lt;|role|&gt;\n" +
    /// content + "\n", then "&lt;|assistant|&gt;\n", encoded with the tokenizer's special tokens (BOS first).
    /// </summary>
    public static string Render(IEnumerable<(string Role, string? Content)> messages)
    {
        var text = new StringBuilder();
        foreach (var (role, content) in messages) text.Append("<|").Append(role).Append("|>\n").Append(content).Append('\n');
        return text.Append("<|assistant|>\n").ToString();
    }

    /// <summary>
    /// The prompt's tokens. With the folder's template: its text encoded without adding special tokens, as
    /// transformers' apply_chat_template does (the template writes BOS itself); otherwise the default template.
    /// </summary>
    public static int[] Encode(ServedModel served, IReadOnlyList<(string Role, string? Content)> messages)
    {
        if (served.ChatTemplate is not { } template) return GenerationRun.Encode(served, Render(messages), "messages");
        if (served.Tokenizer is null)
            throw ApiError.BadRequest($"model version '{served.Version}' has no tokenizer.json, so it cannot encode chat messages; use /v1/completions with token ids", "messages");
        string text;
        try { text = template.Render(messages); }
        catch (TemplateRuntimeException e)
        {
            throw ApiError.BadRequest($"the chat template of model version '{served.Version}' ({Path.GetFileName(template.Source)}) refused the messages: {e.Message}", "messages");
        }
        var ids = served.Tokenizer.Encode(text, addSpecialTokens: false);
        return ids.Length > 0 ? ids : throw ApiError.BadRequest($"the chat template of model version '{served.Version}' rendered these messages as empty text", "messages");
    }

    public static int[] Prompt(ServedModel served, JsonElement body)
    {
        if (!body.TryGetProperty("messages", out var messages) || messages.ValueKind != JsonValueKind.Array || messages.GetArrayLength() == 0)
            throw ApiError.BadRequest("'messages' is required: a non-empty array of {role, content}", "messages");
        var parsed = new List<(string, string?)>();
        int i = 0;
        foreach (var m in messages.EnumerateArray())
        {
            string where = $"messages[{i++}]";
            string role = m.ValueKind == JsonValueKind.Object && m.TryGetProperty("role", out var r) && r.GetString() is { } rs && rs is "system" or "developer" or "user" or "assistant" or "tool"
                ? rs : throw ApiError.BadRequest($"{where}.role must be one of system, developer, user, assistant, tool", where + ".role");
            parsed.Add((role, Content(m, where)));
        }
        return Encode(served, parsed);
    }

    // A missing or null content is None to a template (an assistant turn with only tool calls); text parts are joined.
    static string? Content(JsonElement message, string where)
    {
        if (!message.TryGetProperty("content", out var c) || c.ValueKind == JsonValueKind.Null) return null;
        if (c.ValueKind == JsonValueKind.String) return c.GetString()!;
        if (c.ValueKind != JsonValueKind.Array) throw ApiError.BadRequest($"{where}.content must be a string or an array of text parts", where + ".content");
        var text = new StringBuilder();
        foreach (var part in c.EnumerateArray())
            text.Append(part.ValueKind == JsonValueKind.Object && part.TryGetProperty("type", out var t) && t.GetString() == "text" && part.TryGetProperty("text", out var tx)
                ? tx.GetString() : throw ApiError.BadRequest($"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}}; this model reads text only", where + ".content"));
        return text.ToString();
    }

    public static async Task RespondAsync(HttpContext http, ServedModel served, int[] prompt, GenerationParameters p, JsonElement body)
    {
        string id = "chatcmpl-" + Guid.NewGuid().ToString("N");
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var content = new StringBuilder();
        var logprobs = p.Logprobs >= 0 ? new JsonArray() : null;
        bool streaming = p.Stream;
        var assembler = new TextAssembler(served.Tokenizer, []);

        JsonObject Chunk(JsonObject delta, string? finish, JsonArray? lp) => new()
        {
            ["id"] = id, ["object"] = "chat.completion.chunk", ["created"] = created, ["model"] = served.Version,
            ["choices"] = new JsonArray(new JsonObject
            {
                ["index"] = 0, ["delta"] = delta, ["logprobs"] = lp is null ? null : new JsonObject { ["content"] = lp }, ["finish_reason"] = finish,
            }),
        };

        // The stream starts with the first token, so a refusal (400, 429) before it is still an HTTP status.
        async Task StartOnce()
        {
            if (http.Response.HasStarted) return;
            Sse.Start(http);
            await Sse.WriteAsync(http, Chunk(new JsonObject { ["role"] = "assistant", ["content"] = "" }, null, null));
        }
        var result = await GenerationRun.ExecuteAsync(served, prompt, p, p.Logprobs, async (delta, token) =>
        {
            JsonObject? entry = null;
            if (token is not null && logprobs is not null)
            {
                string tokenText = assembler.TokenText(token.Token);
                entry = new JsonObject
                {
                    ["token"] = tokenText, ["logprob"] = token.Logprob, ["bytes"] = Bytes(tokenText),
                    ["top_logprobs"] = new JsonArray((token.Top ?? []).Select(t =>
                    {
                        var s = assembler.TokenText(t.Token);
                        return (JsonNode)new JsonObject { ["token"] = s, ["logprob"] = t.Logprob, ["bytes"] = Bytes(s) };
                    }).ToArray()),
                };
                logprobs.Add(entry);
            }
            content.Append(delta);
            if (!streaming) return;
            await StartOnce();
            if (delta.Length > 0 || entry is not null)
                await Sse.WriteAsync(http, Chunk(new JsonObject { ["content"] = delta }, null, entry is null ? null : new JsonArray(entry.DeepClone())));
        }, http.RequestAborted);

        if (streaming)
        {
            await StartOnce();
            await Sse.WriteAsync(http, Chunk([], result.FinishReason, null));
            if (p.IncludeUsage)
                await Sse.WriteAsync(http, new JsonObject
                {
                    ["id"] = id, ["object"] = "chat.completion.chunk", ["created"] = created, ["model"] = served.Version,
                    ["choices"] = new JsonArray(), ["usage"] = OpenAiEndpoints.Usage(prompt.Length, result.CompletionTokens),
                });
            await Sse.DoneAsync(http);
            return;
        }
        var response = new JsonObject
        {
            ["id"] = id, ["object"] = "chat.completion", ["created"] = created, ["model"] = served.Version,
            ["choices"] = new JsonArray(new JsonObject
            {
                ["index"] = 0, ["message"] = new JsonObject { ["role"] = "assistant", ["content"] = content.ToString() },
                ["logprobs"] = logprobs is null ? null : new JsonObject { ["content"] = logprobs }, ["finish_reason"] = result.FinishReason,
            }),
            ["usage"] = OpenAiEndpoints.Usage(prompt.Length, result.CompletionTokens),
        };
        await Results.Json(response).ExecuteAsync(http);
    }

    static JsonArray Bytes(string s) => new(Encoding.UTF8.GetBytes(s).Select(b => (JsonNode)(int)b).ToArray());
}
