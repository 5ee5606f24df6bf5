// /v1/completions: a prompt (text or token ids) continued; logprobs in the legacy {tokens, token_logprobs, top_logprobs, text_offset} form.
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Routing;
using Microsoft.AspNetCore.Http;

namespace DeepSeekCluster.ModelServer.Api;

public static class CompletionRequest
{
    public const int MaxLogprobs = 20;

    public static GenerationParameters Parameters(JsonElement body)
    {
        if (GenerationParameters.Bool(body, "echo")) throw ApiError.BadRequest("'echo' is not supported by this server", "echo");
        if (GenerationParameters.Get(body, "suffix") is { ValueKind: not JsonValueKind.Null }) throw ApiError.BadRequest("'suffix' is not supported by this server", "suffix");
        return GenerationParameters.Read(body, maxTokensDefault: 16, body =>
            GenerationParameters.Get(body, "logprobs") switch
            {
                null or { ValueKind: JsonValueKind.Null } => -1,
                var v when v.Value.TryGetInt32(out var n) && n is >= 0 and <= MaxLogprobs => n,
                var v => throw ApiError.BadRequest($"'logprobs' must be an integer from 0 to {MaxLogprobs}, got {v.Value.GetRawText()}", "logprobs"),
            });
    }

    /// <summary>The prompt as a string, an array of token ids, or a one-element array of either (n and batches of prompts are 1 here).</summary>
    public static int[] Prompt(ServedModel served, JsonElement body)
    {
        if (!body.TryGetProperty("prompt", out var prompt)) throw ApiError.BadRequest("'prompt' is required", "prompt");
        if (prompt.ValueKind == JsonValueKind.Array && prompt.GetArrayLength() == 1 && prompt[0].ValueKind is JsonValueKind.String or JsonValueKind.Array)
            prompt = prompt[0];
        if (prompt.ValueKind == JsonValueKind.String) return GenerationRun.Encode(served, prompt.GetString()!, "prompt");
        if (prompt.ValueKind == JsonValueKind.Array && prompt.GetArrayLength() > 0 && prompt.EnumerateArray().All(e => e.ValueKind == JsonValueKind.Number))
            return prompt.EnumerateArray().Select(e => e.TryGetInt32(out var id) ? id : throw ApiError.BadRequest($"prompt token {e.GetRawText()} is not an integer", "prompt")).ToArray();
        throw ApiError.BadRequest("'prompt' must be a string, a non-empty array of token ids, or a one-element array of either", "prompt");
    }

    public static async Task RespondAsync(HttpContext http, ServedModel served, int[] prompt, GenerationParameters p)
    {
        string id = "cmpl-" + Guid.NewGuid().ToString("N");
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var text = new System.Text.StringBuilder();
        var logprobs = p.Logprobs >= 0 ? new Logprobs() : null;
        bool streaming = p.Stream;

        JsonObject Chunk(string delta, string? finish, Logprobs? lp) => new()
        {
            ["id"] = id, ["object"] = "text_completion", ["created"] = created, ["model"] = served.Version,
            ["choices"] = new JsonArray(new JsonObject { ["text"] = delta, ["index"] = 0, ["logprobs"] = lp?.ToJson(), ["finish_reason"] = finish }),
        };

        var result = await GenerationRun.ExecuteAsync(served, prompt, p, p.Logprobs, async (delta, token) =>
        {
            Logprobs? step = null;
            if (token is not null && logprobs is not null)
            {
                step = new Logprobs();
                foreach (var target in new[] { logprobs, step }) target.Add(served, token, text.Length);
            }
            text.Append(delta);
            if (!streaming || (delta.Length == 0 && step is null)) return;
            if (!http.Response.HasStarted) Sse.Start(http);
            await Sse.WriteAsync(http, Chunk(delta, null, step));
        }, http.RequestAborted);

        if (streaming)
        {
            if (!http.Response.HasStarted) Sse.Start(http);
            await Sse.WriteAsync(http, Chunk("", result.FinishReason, null));
            if (p.IncludeUsage)
                await Sse.WriteAsync(http, new JsonObject
                {
                    ["id"] = id, ["object"] = "text_completion", ["created"] = created, ["model"] = served.Version,
                    ["choices"] = new JsonArray(), ["usage"] = OpenAiEndpoints.Usage(prompt.Length, result.CompletionTokens),
                });
            await Sse.DoneAsync(http);
            return;
        }
        var response = Chunk(text.ToString(), result.FinishReason, logprobs);
        if (p.ReturnTokenIds) response["choices"]![0]!["token_ids"] = new JsonArray(result.TokenIds.Select(t => (JsonNode)t).ToArray());
        response["usage"] = OpenAiEndpoints.Usage(prompt.Length, result.CompletionTokens);
        await Results.Json(response).ExecuteAsync(http);
    }

    /// <summary>The legacy completions logprobs object, built token by token.</summary>
    sealed class Logprobs
    {
        readonly JsonArray tokens = [], tokenLogprobs = [], top = [], offsets = [];

        public void Add(ServedModel served, TokenEvent token, int offset)
        {
            var assembler = new TextAssembler(served.Tokenizer, []);
            tokens.Add(assembler.TokenText(token.Token));
            tokenLogprobs.Add(token.Logprob);
            offsets.Add(offset);
            if (token.Top is null) { top.Add(null); return; }
            var alternatives = new JsonObject();
            // Keyed by text, as OpenAI's legacy shape is: two tokens with one text keep the likelier (they come most likely first).
            foreach (var (t, lp) in token.Top) alternatives.TryAdd(assembler.TokenText(t), lp);
            top.Add(alternatives);
        }

        public JsonObject ToJson() => new()
        {
            ["tokens"] = tokens.DeepClone(), ["token_logprobs"] = tokenLogprobs.DeepClone(), ["top_logprobs"] = top.DeepClone(), ["text_offset"] = offsets.DeepClone(),
        };
    }
}
