// A full server answers 429 with Retry-After; a client that goes away mid-stream frees its slot at once.
using System.ClientModel;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Routing;
using Microsoft.Extensions.DependencyInjection;
using OpenAI.Chat;

namespace DeepSeekCluster.ModelServer.Tests;

public class OverloadTests
{
    [Fact]
    public async Task AFullServerAnswers429AndADisconnectedStreamFreesItsSlot()
    {
        await using var server = await ServerHost.StartAsync(new Dictionary<string, string?>
        {
            // A long context, so the streaming request below holds the slot for seconds, not the fraction of a second a
            // short answer of this tiny model takes (a loaded machine delayed the second request past the end of one).
            ["Serving:Models:0:Version"] = "v1", ["Serving:Models:0:Path"] = ModelFolders.Get(1, context: 8192),
            ["Serving:MaxBatch"] = "1", ["Serving:MaxWaiting"] = "0",
        });
        var engine = server.Services.GetRequiredService<ModelRegistry>().Versions["v1"].Engine;
        using var leave = new CancellationTokenSource();
        // The end-of-sequence token banned (logit_bias), so the answer runs to max_tokens: thousands of steps, not the 160
        // greedy tokens this model says before it stops.
        var eos = (int)server.Services.GetRequiredService<ModelRegistry>().Versions["v1"].EosTokenId!;
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 8000, Temperature = 0, LogitBiases = { [eos] = -100 } };
        var stream = server.Chat("v1").CompleteChatStreamingAsync([new UserChatMessage("a long answer")], options, leave.Token).GetAsyncEnumerator(leave.Token);
        Assert.True(await stream.MoveNextAsync()); // the request holds the only batch slot now

        var refused = await Assert.ThrowsAsync<ClientResultException>(() => server.Chat("v1").CompleteChatAsync([new UserChatMessage("me too")]));
        Assert.Equal(429, refused.Status);
        using var http = new HttpClient { BaseAddress = new Uri(server.Url) };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
        {
            Content = new StringContent(new JsonObject { ["model"] = "v1", ["prompt"] = "x" }.ToJsonString(), Encoding.UTF8, "application/json"),
        };
        request.Headers.Authorization = new("Bearer", ServerHost.ApiKey);
        using var raw = await http.SendAsync(request);
        Assert.Equal(HttpStatusCode.TooManyRequests, raw.StatusCode);
        Assert.Equal(TimeSpan.FromSeconds(1), raw.Headers.RetryAfter!.Delta);
        Assert.Equal("rate_limit_exceeded", (string)JsonNode.Parse(await raw.Content.ReadAsStringAsync())!["error"]!["code"]!);

        // The client goes away after its first tokens: the engine drops the request at its next step.
        await leave.CancelAsync();
        await stream.DisposeAsync();
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while ((engine.Running > 0 || engine.Pool.BlocksInUse > 0) && DateTime.UtcNow < deadline) await Task.Delay(20); // a poll interval
        Assert.True(engine.Running == 0 && engine.Pool.BlocksInUse == 0,
            $"30 s after its client left, the engine still runs {engine.Running} request(s) holding {engine.Pool.BlocksInUse} cache block(s)");

        var after = (await server.Chat("v1").CompleteChatAsync([new UserChatMessage("now")], new ChatCompletionOptions { MaxOutputTokenCount = 3 })).Value;
        Assert.Equal("v1", after.Model);
    }
}
