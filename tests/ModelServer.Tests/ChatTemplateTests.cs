// The chat-template interpreter against what transformers renders: real templates (DeepSeek-V3, Llama-3, Qwen's QwQ
// ChatML) from tokenizer_config.json files, with the expected text derived by hand from each template's statements.
using System.Text.Json;
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.ModelServer.Templates;

namespace DeepSeekCluster.ModelServer.Tests;

public class ChatTemplateTests
{
    const string Bos = "<｜begin▁of▁sentence｜>";

    static ChatTemplate Fixture(string name)
    {
        var dir = Directory.CreateTempSubdirectory("chat-template-").FullName;
        File.Copy(Path.Combine(ModelFolders.RepositoryRoot(), "tests", "ModelServer.Tests", "ChatTemplates", name + ".json"), Path.Combine(dir, ChatTemplate.ConfigFile));
        return ChatTemplate.Load(dir)!;
    }

    static List<object?> Messages(string json) => (List<object?>)TemplateValues.FromJson(JsonDocument.Parse(json).RootElement)!;

    static string Render(string template, string variablesJson = "{}")
    {
        var variables = (OrderedDictionary<string, object?>)TemplateValues.FromJson(JsonDocument.Parse(variablesJson).RootElement)!;
        return TemplateRenderer.Render(TemplateParser.Parse(template, "test"), variables.ToDictionary(kv => kv.Key, kv => kv.Value));
    }

    [Fact]
    public void DeepSeekV3TemplateJoinsSystemPromptsAndMarksEachTurn()
    {
        var text = Fixture("deepseek-v3").Render(
        [
            ("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello!"), ("system", "Be brief."), ("user", "2+2?"),
        ]);
        Assert.Equal(Bos + "You are helpful.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>", text);
    }

    [Fact]
    public void DeepSeekV3TemplateRendersToolCallsAndOutputsWithoutAGenerationPrompt()
    {
        var messages = Messages("""
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
         {"role": "tool", "content": "22C"}, {"role": "tool", "content": "sunny"}]
        """);
        var text = Fixture("deepseek-v3").Render(messages, addGenerationPrompt: true);
        // One call: the template closes the call list only from the second call on; after tool outputs no <｜Assistant｜>.
        Assert.Equal(Bos + "<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"
            + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>", text);
    }

    [Fact]
    public void Llama3TemplateTrimsOnlyTheContentAndPutsBosFirst()
    {
        // `+ message['content'] | trim +`: the filter binds to the content alone, not to the concatenation.
        var text = Fixture("llama-3").Render([("system", "  Be brief. "), ("user", "Hi\n")]);
        Assert.Equal("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            + "<|start_header_id|>assistant<|end_header_id|>\n\n", text);
    }

    [Fact]
    public void QwqChatMlTemplateAddsItsDefaultSystemPromptAndGroupsToolResponses()
    {
        var chatMl = Fixture("qwq");
        Assert.Equal("<|im_start|>system\nYou are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step.<|im_end|>\n"
            + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", chatMl.Render([("user", "Hi")]));
        var messages = Messages("""
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Add 2 and 3"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
         {"role": "tool", "content": "5"}, {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "It is 5."}]
        """);
        Assert.Equal("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nAdd 2 and 3<|im_end|>\n"
            + "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call><|im_end|>\n"
            + "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
            + "<|im_start|>assistant\nIt is 5.<|im_end|>\n", chatMl.Render(messages, addGenerationPrompt: false));
    }

    [Fact]
    public void WhitespaceFollowsTrimBlocksLstripBlocksAndDashMarkers()
    {
        const string template = "{# a comment #}\n<ul>\n  {% for x in items %}\n    <li>{{ x }}</li>\n  {% endfor %}\n</ul>\n{{- \"  tail\" }}\n{% raw %}{{ not evaluated }}{% endraw %}\n";
        Assert.Equal("<ul>\n    <li>1</li>\n    <li>2</li>\n</ul>  tail\n{{ not evaluated }}", Render(template, """{"items": [1, 2]}"""));
        Assert.Equal("a| b", Render("a  \n {%- if true -%}  \n |  {%- endif %}  \n{{- ' ' -}}  b"));
    }

    [Theory]
    [InlineData("{{ 'abcdef'[1:4] }}|{{ 'abcdef'[-2:] }}|{{ [1,2,3,4][::-1] }}|{{ [1,2,3][:-1] }}|{{ xs[0]['k'] }}", "bcd|ef|[4, 3, 2, 1]|[1, 2]|v")]
    [InlineData("{{ 'a' ~ 1 ~ none }} {{ 'a' + 'b' }} {{ 7 // 2 }} {{ 7 / 2 }} {{ 1 + 2 * 3 }} {{ -2 ** 2 }}", "a1None ab 3 3.5 7 4")]
    [InlineData("{{ 'ell' in 'hello' }} {{ 3 in [1,2] }} {{ 'k' not in {'k': 1} }} {{ not 1 == 2 }} {{ 'a' if false else 'b' }}", "True False False True b")]
    [InlineData("{{ missing | default('d') }} {{ '' | default('e', true) }} {{ [1,2,3] | length }} {{ 'héllo' | length }} {{ [4,5] | first }}{{ [4,5] | last }} {{ ' x ' | trim }}.", "d e 3 5 45 x.")]
    [InlineData("{{ {'a': [1, 'q\"é'], 'b': none, 'c': true, 'd': 1.5} | tojson }}", "{\"a\": [1, \"q\\\"é\"], \"b\": null, \"c\": true, \"d\": 1.5}")]
    [InlineData("{{ missing is defined }} {{ none is none }} {{ 'a' is string }} {{ 1 is not string }} {{ xs is mapping }}", "False True True True False")]
    [InlineData("{% for k, v in d.items() %}{{ loop.index0 }}{{ k }}={{ v }}{% if not loop.last %},{% endif %}{% endfor %}", "0a=1,1b=2")]
    [InlineData("{% set n = 0 %}{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set n = n + i %}{% set ns.n = ns.n + i %}{% endfor %}{{ n }} {{ ns.n }}", "0 3")]
    [InlineData("{% for i in range(10) %}{% if i == 1 %}{% continue %}{% elif i > 3 %}{% break %}{% else %}{{ i }}{% endif %}{% endfor %}", "023")]
    [InlineData("{{ 'a</think>b'.split('</think>')[-1] }} {{ '  x '.strip() }} {{ 'abc'.startswith('ab') }} {{ d.get('z', 'none') }}", "b x True none")]
    [InlineData("{% for m in ms if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}:{{ m.role }} {% endfor %}{% for x in [] %}x{% else %}empty{% endfor %}", "1/2:user 2/2:assistant empty")]
    [InlineData("{% set greeting %}Hi {{ d['a'] }}{% endset %}{{ greeting | upper }} {{ \"tab\\tq\\\"\" }}", "HI 1 tab\tq\"")]
    public void ExpressionsAndStatementsFollowJinja(string template, string expected) =>
        Assert.Equal(expected, Render(template, """{"xs": [{"k": "v"}], "d": {"a": 1, "b": 2}, "ms": [{"role": "system"}, {"role": "user"}, {"role": "assistant"}]}"""));

    [Theory]
    [InlineData("{% for m in messages %}\n  {% macro x() %}{% endmacro %}\n{% endfor %}", 2, 3, "unsupported statement '{% macro %}'")]
    [InlineData("{{ messages | wordcount }}", 1, 15, "unsupported filter 'wordcount'")]
    [InlineData("ok\n{% if messages %}x", 2, 1, "'{% if %}' is never closed with '{% endif %}'")]
    [InlineData("{{ messages[0].role is divisibleby(3) }}", 1, 24, "unsupported test 'is divisibleby'")]
    [InlineData("{{ lipsum(2) }}", 1, 4, "unsupported function 'lipsum(…)'")]
    [InlineData("{{ messages.pop() }}", 1, 13, "unsupported method '.pop(…)'")]
    public void UnsupportedSyntaxIsRefusedAtLoadNamingFileLineColumnAndConstruct(string template, int line, int column, string construct)
    {
        var dir = Directory.CreateTempSubdirectory("chat-template-bad-").FullName;
        File.WriteAllText(Path.Combine(dir, ChatTemplate.ConfigFile), JsonSerializer.Serialize(new { chat_template = template }));
        var e = Assert.Throws<TemplateSyntaxException>(() => ChatTemplate.Load(dir));
        Assert.Contains(Path.Combine(dir, ChatTemplate.ConfigFile), e.Message);
        Assert.Contains($"line {line}, column {column}", e.Message);
        Assert.Contains(construct, e.Message);
    }

    [Fact]
    public void AModelWhoseTemplateCannotRunIsRefusedWhenItLoads()
    {
        var dir = Directory.CreateTempSubdirectory("chat-template-model-").FullName;
        foreach (var file in Directory.GetFiles(ModelFolders.Get(1))) File.Copy(file, Path.Combine(dir, Path.GetFileName(file)));
        File.WriteAllText(Path.Combine(dir, ChatTemplate.JinjaFile), "{% for m in messages %}\n{{ m.content }}{% include 'x' %}{% endfor %}");
        var e = Assert.ThrowsAny<InvalidDataException>(() => ServedModel.Load("bad", dir, WeightFormat.Fp32, new EngineOptions(), null));
        Assert.Equal($"{Path.Combine(dir, ChatTemplate.JinjaFile)}: line 2, column 16: unsupported statement '{{% include %}}': "
            + "this server runs for, if/elif/else, set, break, continue, raw and generation", e.Message);
    }

    [Fact]
    public void AFolderWithoutATemplateHasNone()
    {
        var dir = Directory.CreateTempSubdirectory("chat-template-none-").FullName;
        Assert.Null(ChatTemplate.Load(dir));
        File.WriteAllText(Path.Combine(dir, ChatTemplate.ConfigFile), """{"bos_token": "<s>"}""");
        Assert.Null(ChatTemplate.Load(dir));
    }
}
