// The OpenAI API over real HTTP with the official OpenAI .NET client: answers equal what the model gives alone.
using System.ClientModel;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using OpenAI.Chat;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Tests;

public class OpenAiApiTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    readonly ServerHost server = fixture.Server;
    static readonly SamplingOptions Greedy = new() { MaxNewTokens = 12 };

    [Fact]
    public async Task GreedyCompletionEqualsGpuWorkerGenerateOnTheSameFolder()
    {
        const string prompt = "And God said";
        var (ids, text) = ServerFixture.GpuWorkerGenerate(fixture.V1, prompt, 12);
        var answer = await server.CompleteAsync(new JsonObject
        {
            ["model"] = "deepseek", ["prompt"] = prompt, ["max_tokens"] = 12, ["temperature"] = 0, ["return_token_ids"] = true,
        });
        var choice = answer["choices"]![0]!;
        Assert.Equal(ids, choice["token_ids"]!.AsArray().Select(t => (long)t!));
        Assert.Equal(text, (string)choice["text"]!);
        Assert.Equal("v1", (string)answer["model"]!);
        Assert.Equal(ids.Length, (int)answer["usage"]!["completion_tokens"]!);
        Assert.Equal(ServerFixture.Tokenizer(fixture.V1).Encode(prompt, addSpecialTokens: true).Length, (int)answer["usage"]!["prompt_tokens"]!);
    }

    [Fact]
    public async Task ChatUsesTheDefaultTemplateAndCountsUsage()
    {
        var chat = server.Chat("deepseek");
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 10, Temperature = 0 };
        var reply = (await chat.CompleteChatAsync([new SystemChatMessage("Be brief."), new UserChatMessage("Who made the heaven?")], options)).Value;

        var templated = "<|system|>\nBe brief.\n<|user|>\nWho made the heaven?\n<|assistant|>\n";
        var alone = ServerFixture.Alone(fixture.V1, templated, Greedy with { MaxNewTokens = 10 });
        Assert.Equal(alone.Text, reply.Content[0].Text);
        Assert.Equal(alone.PromptTokens, reply.Usage.InputTokenCount);
        Assert.Equal(alone.Ids.Length, reply.Usage.OutputTokenCount);
        Assert.Equal(alone.Ids.Length == 10 ? ChatFinishReason.Length : ChatFinishReason.Stop, reply.FinishReason);
    }

    [Fact]
    public async Task StreamingChatThroughTheClientEqualsTheWholeAnswer()
    {
        var chat = server.Chat("deepseek");
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 16, Temperature = 0 };
        ChatMessage[] messages = [new UserChatMessage("In the beginning")];
        var whole = (await chat.CompleteChatAsync(messages, options)).Value.Content[0].Text;
        var streamed = new StringBuilder();
        ChatFinishReason? finish = null;
        int updates = 0;
        await foreach (var update in chat.CompleteChatStreamingAsync(messages, options))
        {
            updates++;
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
            finish ??= update.FinishReason;
        }
        Assert.Equal(whole, streamed.ToString());
        Assert.NotNull(finish);
        Assert.True(updates > 3, $"the answer came in {updates} updates, not token by token");
    }

    [Fact]
    public async Task StreamingCompletionIsServerSentEventsEndingWithDone()
    {
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        var body = new JsonObject { ["model"] = "v1", ["prompt"] = "Let there be", ["max_tokens"] = 8, ["temperature"] = 0, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true } };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
        request.Headers.Authorization = new("Bearer", ServerHost.ApiKey);
        using var response = await http.SendAsync(request);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.All(events, e => Assert.StartsWith("data: ", e));
        Assert.Equal("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => JsonNode.Parse(e["data: ".Length..])!).ToList();
        Assert.All(chunks, c => Assert.Equal("text_completion", (string)c["object"]!));
        var text = string.Concat(chunks.Where(c => c["choices"]!.AsArray().Count > 0).Select(c => (string)c["choices"]![0]!["text"]!));
        var usage = chunks[^1]["usage"]!;

        var alone = ServerFixture.Alone(fixture.V1, "Let there be", Greedy with { MaxNewTokens = 8 });
        Assert.Equal(alone.Text, text);
        Assert.Equal(alone.Ids.Length, (int)usage["completion_tokens"]!);
        Assert.NotNull(chunks[^2]["choices"]![0]!["finish_reason"]);
    }

    [Fact]
    public async Task AStopSequenceCutsTheTextAndFinishesWithStop()
    {
        var chat = server.Chat("deepseek");
        ChatMessage[] messages = [new UserChatMessage("And the earth was")];
        var full = (await chat.CompleteChatAsync(messages, new ChatCompletionOptions { MaxOutputTokenCount = 24, Temperature = 0 })).Value.Content[0].Text;
        Assert.True(full.Length >= 6, $"the unstopped answer '{full}' is too short to cut");
        var stop = full.Substring(full.Length / 2, 2);
        var expected = full[..full.IndexOf(stop, StringComparison.Ordinal)];

        var options = new ChatCompletionOptions { MaxOutputTokenCount = 24, Temperature = 0 };
        options.StopSequences.Add(stop);
        var stopped = (await chat.CompleteChatAsync(messages, options)).Value;
        Assert.Equal(expected, stopped.Content.Count == 0 ? "" : stopped.Content[0].Text);
        Assert.Equal(ChatFinishReason.Stop, stopped.FinishReason);

        var streamed = new StringBuilder();
        await foreach (var update in chat.CompleteChatStreamingAsync(messages, options))
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
        Assert.Equal(expected, streamed.ToString()); // nothing of the stop sequence leaks into the stream either
    }

    [Fact]
    public async Task ErrorsAreOpenAiShapedAndSurfaceAsClientExceptions()
    {
        var unknown = await Assert.ThrowsAsync<ClientResultException>(() => server.Chat("no-such-model").CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.Equal(400, unknown.Status);
        Assert.Contains("'no-such-model' does not exist", unknown.Message);
        Assert.Contains("deepseek, v1, v2", unknown.Message);

        var wrongKey = await Assert.ThrowsAsync<ClientResultException>(() => server.Chat("deepseek", "not-a-key").CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.Equal(401, wrongKey.Status);

        var badTemperature = await Assert.ThrowsAsync<ClientResultException>(() =>
            server.Chat("deepseek").CompleteChatAsync([new UserChatMessage("hi")], new ChatCompletionOptions { Temperature = 3 }));
        Assert.Equal(400, badTemperature.Status);
        Assert.Contains("'temperature' must be a number from 0 to 2", badTemperature.Message);

        var tooLong = await Assert.ThrowsAsync<ClientResultException>(() => server.CompleteAsync(new JsonObject
        {
            ["model"] = "deepseek", ["prompt"] = new JsonArray(Enumerable.Repeat(5, 200).Select(i => (JsonNode)i).ToArray()),
        }));
        Assert.True(400 == tooLong.Status, tooLong.Message);
        Assert.True(tooLong.Message.Contains("context holds 128"), tooLong.Message);

        var n2 = await Assert.ThrowsAsync<ClientResultException>(() => server.CompleteAsync(new JsonObject { ["model"] = "v1", ["prompt"] = "x", ["n"] = 2 }));
        Assert.Equal(400, n2.Status);

        // The raw body: OpenAI's shape, for clients that parse it themselves; and a malformed body.
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = new StringContent("{\"model\": ", Encoding.UTF8, "application/json") };
        request.Headers.Authorization = new("Bearer", ServerHost.ApiKey);
        using var malformed = await http.SendAsync(request);
        Assert.Equal(HttpStatusCode.BadRequest, malformed.StatusCode);
        var error = JsonNode.Parse(await malformed.Content.ReadAsStringAsync())!["error"]!;
        Assert.Equal("invalid_request_error", (string)error["type"]!);
        Assert.StartsWith("the request body is not valid JSON", (string)error["message"]!);

        using var noKey = await http.GetAsync("/v1/models");
        Assert.Equal(HttpStatusCode.Unauthorized, noKey.StatusCode);
        // The cluster token is accepted wherever an API key is.
        var withToken = await server.CompleteAsync(new JsonObject { ["model"] = "v1", ["prompt"] = "x", ["max_tokens"] = 1 }, ServerHost.ClusterToken);
        Assert.Equal("v1", (string)withToken["model"]!);
    }

    [Fact]
    public async Task LogitBiasBansAndForcesTokensAndTheLogprobsStayTheModels()
    {
        JsonObject Request(JsonObject? bias) => new()
        {
            ["model"] = "v1", ["prompt"] = "And God said", ["max_tokens"] = 6, ["temperature"] = 0, ["return_token_ids"] = true,
            ["logprobs"] = 0, ["logit_bias"] = bias,
        };
        static long[] Ids(JsonNode answer) => answer["choices"]![0]!["token_ids"]!.AsArray().Select(t => (long)t!).ToArray();
        var plain = Ids(await server.CompleteAsync(Request(null)));

        // -100 on the greedy first token: another token comes first.
        var banned = Ids(await server.CompleteAsync(Request(new JsonObject { [plain[0].ToString()] = -100 })));
        Assert.NotEqual(plain[0], banned[0]);
        Assert.DoesNotContain(plain[0], banned);

        // +100 on one token: greedy picks it every time; its reported log-probability is the model's (below 0, not ~0).
        long forcedToken = plain[0] == 7 ? 8 : 7;
        var forcedAnswer = await server.CompleteAsync(Request(new JsonObject { [forcedToken.ToString()] = 100 }));
        Assert.All(Ids(forcedAnswer), t => Assert.Equal(forcedToken, t));
        var logprobs = forcedAnswer["choices"]![0]!["logprobs"]!["token_logprobs"]!.AsArray().Select(l => (double)l!).ToArray();
        Assert.All(logprobs, l => Assert.True(l < -0.5, $"the forced token's log-probability {l} should be the model's own"));

        // Through the official client (its LogitBiases), and the refusals that name the field.
        var chat = server.Chat("v1");
        var reply = (await chat.CompleteChatAsync([new UserChatMessage("hi")],
            new ChatCompletionOptions { MaxOutputTokenCount = 3, Temperature = 0, LogitBiases = { [(int)forcedToken] = 100 } })).Value;
        Assert.Equal(3, reply.Usage.OutputTokenCount);
        foreach (var (bias, expected) in new (JsonObject, string)[]
                 {
                     (new JsonObject { ["abc"] = 1 }, "keys must be token ids"),
                     (new JsonObject { ["5"] = 200 }, "for token 5 must be a number from -100 to 100"),
                     (new JsonObject { ["100000"] = 1 }, "names token 100000, outside the vocabulary"),
                 })
        {
            var refused = await Assert.ThrowsAsync<ClientResultException>(() => server.CompleteAsync(Request(bias)));
            Assert.Equal(400, refused.Status);
            Assert.Contains(expected, refused.Message);
        }
    }

    [Fact]
    public async Task ConcurrentStreamsGetTheTokensTheyWouldGetAlone()
    {
        var questions = Enumerable.Range(0, 8).Select(i => $"Question {i}: the {new string('a', i)} word").ToArray();
        var alone = questions.Select(q => ServerFixture.Alone(fixture.V1, $"<|user|>\n{q}\n<|assistant|>\n", Greedy with { MaxNewTokens = 14 }).Text).ToArray();
        var streams = questions.Select(q => Task.Run(async () =>
        {
            var text = new StringBuilder();
            var options = new ChatCompletionOptions { MaxOutputTokenCount = 14, Temperature = 0 };
            await foreach (var update in server.Chat("v1").CompleteChatStreamingAsync([new UserChatMessage(q)], options))
                foreach (var part in update.ContentUpdate) text.Append(part.Text);
            return text.ToString();
        })).ToArray();
        Assert.Equal(alone, await Task.WhenAll(streams));
    }

    [Fact]
    public async Task LogprobsAreTheModelsLogSoftmaxAtEachChosenToken()
    {
        var answer = await server.CompleteAsync(new JsonObject
        {
            ["model"] = "v1", ["prompt"] = "The waters", ["max_tokens"] = 5, ["temperature"] = 0, ["logprobs"] = 3, ["return_token_ids"] = true,
        });
        var choice = answer["choices"]![0]!;
        var generated = choice["token_ids"]!.AsArray().Select(t => (int)t!).ToArray();
        var logprobs = choice["logprobs"]!["token_logprobs"]!.AsArray().Select(x => (double)x!).ToArray();
        var top = choice["logprobs"]!["top_logprobs"]!.AsArray();

        // Independently: one full forward over prompt + answer, no cache, log_softmax in float64.
        var loaded = HfModelFolder.Load(fixture.V1);
        using var model = loaded.Model;
        var prompt = loaded.Tokenizer!.Encode("The waters", addSpecialTokens: true);
        var all = prompt.Concat(generated).Select(t => (long)t).ToArray();
        using var noGrad = no_grad();
        using var logits = model.Forward(tensor(all).unsqueeze(0)).Logits_BTV;
        using var logp = logits[0].to_type(ScalarType.Float64).log_softmax(-1);
        for (int i = 0; i < generated.Length; i++)
        {
            double want = logp[prompt.Length - 1 + i, generated[i]].item<double>();
            Assert.True(Math.Abs(want - logprobs[i]) < 1e-4, $"token {i}: {want} alone, {logprobs[i]} served; served {string.Join(" ", logprobs)}; top {top.ToJsonString()}; ids {string.Join(" ", generated)}");
            Assert.InRange(top[i]!.AsObject().Count, 1, 3); // alternatives are keyed by their text, which two tokens may share
            Assert.Equal(want, top[i]!.AsObject().Max(kv => (double)kv.Value!), 4); // greedy: the chosen token is the most likely
        }
    }

    [Fact]
    public async Task ModelsListsRoutesAndVersions()
    {
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        http.DefaultRequestHeaders.Authorization = new("Bearer", ServerHost.ApiKey);
        var list = JsonNode.Parse(await http.GetStringAsync("/v1/models"))!;
        Assert.Equal(["deepseek", "v1", "v2"], list["data"]!.AsArray().Select(m => (string)m!["id"]!).Order());
    }

    [Fact]
    public async Task MetricsCountRequestsByStatusAndVersionAndTimeTheTokens()
    {
        await server.CompleteAsync(new JsonObject { ["model"] = "v2", ["prompt"] = "metrics", ["max_tokens"] = 3, ["temperature"] = 0 });
        await Assert.ThrowsAsync<ClientResultException>(() => server.CompleteAsync(new JsonObject { ["model"] = "v2", ["prompt"] = "x", ["top_p"] = 5 }));
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        // The exporter caches a scrape briefly: read until the request just made is in it.
        string text = "";
        for (int attempt = 0; attempt < 40 && !HasSeries(text, "deepseek_serving_requests_total", "model_version=\"v2\"", "status=\"200\""); attempt++)
        {
            if (attempt > 0) await Task.Delay(250);
            text = await http.GetStringAsync("/metrics");
        }
        Assert.True(HasSeries(text, "deepseek_serving_requests_total", "model_version=\"v2\"", "status=\"200\""), text);
        Assert.True(HasSeries(text, "deepseek_serving_requests_total", "model_version=\"none\"", "status=\"400\""));
        Assert.True(HasSeries(text, "deepseek_serving_time_to_first_token_seconds_bucket", "model_version=\"v2\"", "le=\"0.005\""));
        Assert.True(HasSeries(text, "deepseek_serving_time_per_output_token_seconds_count", "model_version=\"v2\""));
        foreach (var name in new[] { "deepseek_serving_output_tokens_total", "deepseek_serving_prompt_tokens_total", "deepseek_serving_cache_blocks",
                                     "deepseek_serving_cache_blocks_used", "deepseek_serving_running", "deepseek_serving_waiting" })
            Assert.True(HasSeries(text, name, "model_version=\"v1\""), $"{name} for v1 is not in /metrics");
    }

    /// <summary>A series line of <paramref name="name"/> carrying every given label (the exporter adds otel_scope_name first).</summary>
    static bool HasSeries(string text, string name, params string[] labels) =>
        text.Split('\n').Any(l => l.StartsWith(name + "{", StringComparison.Ordinal) && labels.All(l[..(l.IndexOf('}') + 1)].Contains));
}
