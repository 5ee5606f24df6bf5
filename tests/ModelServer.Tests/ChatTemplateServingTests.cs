// A folder with a chat_template in tokenizer_config.json, served over HTTP: the official OpenAI client's chat request
// is rendered by that template (not the default one), and a template's raise_exception reaches the client as a 400.
using System.ClientModel;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Templates;
using OpenAI.Chat;

namespace DeepSeekCluster.ModelServer.Tests;

public class ChatTemplateServingTests
{
    // Llama-3's template (tests/ModelServer.Tests/ChatTemplates/llama-3.json) behind a guard that refuses a leading tool turn.
    const string Guard = "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('a conversation cannot start with a tool message') }}{% endif %}";

    static string TemplatedFolder()
    {
        var dir = Directory.CreateTempSubdirectory("chat-template-served-").FullName;
        // A 512-token context: the templated prompt is ~150 tokens with the tests' 300-token vocabulary.
        foreach (var file in Directory.GetFiles(ModelFolders.Get(1, context: 512))) File.Copy(file, Path.Combine(dir, Path.GetFileName(file)));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(ModelFolders.RepositoryRoot(), "tests", "ModelServer.Tests", "ChatTemplates", "llama-3.json")))!;
        config["chat_template"] = Guard + (string)config["chat_template"]!;
        File.WriteAllText(Path.Combine(dir, ChatTemplate.ConfigFile), config.ToJsonString());
        return dir;
    }

    [Fact]
    public async Task ChatThroughTheClientIsRenderedByTheFolderTemplate()
    {
        var folder = TemplatedFolder();
        await using var server = await ServerHost.StartAsync(new Dictionary<string, string?>
        {
            ["Serving:Models:0:Version"] = "templated", ["Serving:Models:0:Path"] = folder,
        });
        var chat = server.Chat("templated");
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 8, Temperature = 0 };
        var reply = (await chat.CompleteChatAsync([new SystemChatMessage(" Be brief. "), new UserChatMessage("Who made the heaven?")], options)).Value;

        // What transformers renders for these messages, encoded without added special tokens (the template wrote BOS).
        const string rendered = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            + "<|start_header_id|>user<|end_header_id|>\n\nWho made the heaven?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        var tokenizer = ServerFixture.Tokenizer(folder);
        var ids = tokenizer.Encode(rendered, addSpecialTokens: false);
        Assert.Equal(tokenizer.BosTokenId, ids[0]);
        Assert.Equal(ids.Length, reply.Usage.InputTokenCount);
        Assert.NotEqual(tokenizer.Encode("<|system|>\n Be brief. \n<|user|>\nWho made the heaven?\n<|assistant|>\n", addSpecialTokens: true).Length, ids.Length);

        // The same token ids as a completion prompt give the same greedy answer: the chat prompt was exactly these tokens.
        var completion = await server.CompleteAsync(new JsonObject
        {
            ["model"] = "templated", ["prompt"] = new JsonArray(ids.Select(i => (JsonNode)i).ToArray()), ["max_tokens"] = 8, ["temperature"] = 0,
        });
        Assert.Equal((string)completion["choices"]![0]!["text"]!, reply.Content[0].Text);

        var refused = await Assert.ThrowsAsync<ClientResultException>(() => chat.CompleteChatAsync([new ToolChatMessage("call_1", "42")], options));
        Assert.Equal(400, refused.Status);
        Assert.Contains("a conversation cannot start with a tool message", refused.Message);
        Assert.Contains(ChatTemplate.ConfigFile, refused.Message);
    }
}
