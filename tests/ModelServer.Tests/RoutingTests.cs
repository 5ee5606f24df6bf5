// A/B routing (weights, pinning, sticky users) and a hot swap that loses no accepted request.
using System.Net;
using System.Net.Http.Json;
using System.Text;
using DeepSeekCluster.ModelServer.Routing;
using OpenAI.Chat;

namespace DeepSeekCluster.ModelServer.Tests;

public class RoutingTests
{
    static Dictionary<string, string?> TwoVersions(string routes) => new()
    {
        ["Serving:Models:0:Version"] = "v1", ["Serving:Models:0:Path"] = ModelFolders.Get(1),
        ["Serving:Models:1:Version"] = "v2", ["Serving:Models:1:Path"] = ModelFolders.Get(2),
        [$"Serving:Routes:deepseek:v1"] = "1", [$"Serving:Routes:deepseek:v2"] = routes,
    };

    [Fact]
    public void TheRouteTableSplitsByWeightAndKeepsEachUserOnOneVersion()
    {
        var table = new RouteTable(new Dictionary<string, IReadOnlyDictionary<string, double>> { ["m"] = new Dictionary<string, double> { ["a"] = 3, ["b"] = 1 } });
        var byUser = Enumerable.Range(0, 4000).Select(i => table.Choose("m", $"user-{i}")!).ToList();
        Assert.InRange(byUser.Count(v => v == "b") / 4000.0, 0.22, 0.28); // weight 1 of 4
        for (int i = 0; i < 50; i++) Assert.Equal(byUser[i], table.Choose("m", $"user-{i}")); // sticky
        Assert.Null(table.Choose("a", null)); // a version name is no route: the registry pins it
        Assert.Contains("weights sum to 0", Assert.Throws<ArgumentException>(() =>
            new RouteTable(new Dictionary<string, IReadOnlyDictionary<string, double>> { ["m"] = new Dictionary<string, double> { ["a"] = 0 } })).Message);
    }

    [Fact]
    public async Task RequestsArePinnedToANamedVersionAndStickyPerUserOnARoute()
    {
        await using var server = await ServerHost.StartAsync(TwoVersions("1"));
        Assert.Equal("v2", (await server.Chat("v2").CompleteChatAsync([new UserChatMessage("x")], new ChatCompletionOptions { MaxOutputTokenCount = 1 })).Value.Model);
        var seen = new HashSet<string>();
        for (int u = 0; u < 6; u++)
        {
            var options = new ChatCompletionOptions { MaxOutputTokenCount = 1, EndUserId = $"user-{u}" };
            var first = (await server.Chat("deepseek").CompleteChatAsync([new UserChatMessage("x")], options)).Value.Model;
            var second = (await server.Chat("deepseek").CompleteChatAsync([new UserChatMessage("y")], options)).Value.Model;
            Assert.Equal(first, second);
            seen.Add(first);
        }
        Assert.Equal(["v1", "v2"], seen.Order()); // six users over a 1:1 split: both versions get traffic (fixed hashes)
    }

    [Fact]
    public async Task AHotSwapLosesNoAcceptedRequest()
    {
        await using var server = await ServerHost.StartAsync(new Dictionary<string, string?>
        {
            ["Serving:Models:0:Version"] = "v1", ["Serving:Models:0:Path"] = ModelFolders.Get(1), ["Serving:Routes:deepseek:v1"] = "1",
        });
        var questions = Enumerable.Range(0, 4).Select(i => $"Swap {i}").ToArray();
        var alone = questions.Select(q => ServerFixture.Alone(ModelFolders.Get(1), $"<|user|>\n{q}\n<|assistant|>\n", new() { MaxNewTokens = 30 }).Text).ToArray();
        var firstTokens = questions.Select(_ => new TaskCompletionSource()).ToArray();
        var streams = questions.Select((q, i) => Task.Run(async () =>
        {
            var text = new StringBuilder();
            await foreach (var update in server.Chat("deepseek").CompleteChatStreamingAsync([new UserChatMessage(q)], new ChatCompletionOptions { MaxOutputTokenCount = 30, Temperature = 0 }))
            {
                foreach (var part in update.ContentUpdate) text.Append(part.Text);
                firstTokens[i].TrySetResult();
            }
            return text.ToString();
        })).ToArray();
        await Task.WhenAll(firstTokens.Select(t => t.Task));

        // While they stream: load v2 beside v1, move the route, retire v1 (which waits for the streams).
        using var admin = new HttpClient { BaseAddress = new Uri(server.Url) };
        admin.DefaultRequestHeaders.Authorization = new("Bearer", ServerHost.ClusterToken);
        var load = await admin.PostAsJsonAsync("/admin/models", new { version = "v2", path = ModelFolders.Get(2), quantization = "int8" });
        Assert.Equal(HttpStatusCode.Created, load.StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await admin.PutAsJsonAsync("/admin/routes", new Dictionary<string, Dictionary<string, double>> { ["deepseek"] = new() { ["v2"] = 1 } })).StatusCode);
        var afterSwap = (await server.Chat("deepseek").CompleteChatAsync([new UserChatMessage("new")], new ChatCompletionOptions { MaxOutputTokenCount = 2 })).Value.Model;
        var retire = admin.DeleteAsync("/admin/models/v1");

        Assert.Equal(alone, await Task.WhenAll(streams)); // every accepted request finished on v1, whole
        Assert.Equal(HttpStatusCode.NoContent, (await retire).StatusCode);
        Assert.Equal("v2", afterSwap);
        Assert.False(server.Services.GetService(typeof(ModelRegistry)) is ModelRegistry r && r.Versions.ContainsKey("v1"));

        // The admin API takes the cluster token only.
        using var withKey = new HttpClient { BaseAddress = new Uri(server.Url) };
        withKey.DefaultRequestHeaders.Authorization = new("Bearer", ServerHost.ApiKey);
        Assert.Equal(HttpStatusCode.Unauthorized, (await withKey.DeleteAsync("/admin/models/v2")).StatusCode);
    }
}
