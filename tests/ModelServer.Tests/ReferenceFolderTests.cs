// The server on a folder this code never wrote: the reference port's tiny DeepSeek-V3 (tests/reference/make_goldens.py).
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.ModelServer.Tests;

public class ReferenceFolderTests
{
    [Fact]
    public async Task TheServerGeneratesWhatTheReferenceGenerates()
    {
        using var expected = SafeTensors.Open(ModelFolders.ReferenceExpected);
        var prompt = expected.Read("greedy_prompt").data<long>().ToArray();
        var want = expected.Read("greedy_continuation").data<long>().ToArray();
        await using var server = await ServerHost.StartAsync(new Dictionary<string, string?>
        {
            ["Serving:Models:0:Version"] = "reference", ["Serving:Models:0:Path"] = ModelFolders.ReferenceTiny, ["Serving:BlockSize"] = "4",
        });
        var answer = await server.CompleteAsync(new JsonObject
        {
            ["model"] = "reference", ["prompt"] = new JsonArray(prompt.Select(t => (JsonNode)t).ToArray()), ["max_tokens"] = want.Length,
            ["temperature"] = 0, ["return_token_ids"] = true,
        });
        var choice = answer["choices"]![0]!;
        Assert.Equal(want, choice["token_ids"]!.AsArray().Select(t => (long)t!));
        // No tokenizer.json in that folder: the text is the ids, as gpu-worker generate prints them.
        Assert.Equal(string.Concat(want.Select(t => " " + t)), (string)choice["text"]!);
    }
}
