// Bad task input: every error names the file and line (or the task) and what was expected.
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.Training.Tests.Harness;

public class TaskFileErrorTests
{
    static string Write(params string[] lines)
    {
        var path = Path.Combine(Directory.CreateTempSubdirectory("task-").FullName, "bad.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    [Theory]
    [InlineData("{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 1}\n{\"context\": \"a\", \"choices\": [\" b\"", ":2: not a JSON object")]
    [InlineData("{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 2}", ":1: \"gold\" must be an integer index into \"choices\" (0 to 1)")]
    [InlineData("{\"context\": \"a\", \"choice\": [\" b\", \" c\"], \"gold\": 0}", ":1: unknown key \"choice\"")]
    [InlineData("{\"context\": \"a\", \"target\": \" b\"}\n\n{\"text\": \"c\"}", ":3: a perplexity line in a cloze task")]
    [InlineData("{\"context\": \"a\", \"target\": \"\"}", ":1: \"target\" is empty")]
    [InlineData("[1, 2]", ":1: expected a JSON object, found a Array")]
    [InlineData("{\"context\": \"a\", \"choices\": [\" b\"], \"gold\": 0}", ":1: expected \"choices\" (an array of at least 2 strings)")]
    public void AMalformedLineIsRefusedNamingTheFileAndLine(string content, string message)
    {
        var path = Write(content.Split('\n'));
        var e = Assert.Throws<InvalidDataException>(() => EvalTask.Load(path));
        Assert.Contains(path + message, e.Message);
    }

    [Fact]
    public void AnEmptyTaskFileIsRefused()
    {
        var path = Write("", "  ");
        Assert.Contains($"{path}: the task file holds no example", Assert.Throws<InvalidDataException>(() => EvalTask.Load(path)).Message);
    }

    [Fact]
    public void AnUnknownTaskNameListsTheShippedTasks()
    {
        var e = Assert.Throws<ArgumentException>(() => EvalTask.Resolve("hellaswag"));
        Assert.Contains("unknown task 'hellaswag'", e.Message);
        Assert.Contains("kjv_cloze, kjv_heldout, kjv_nextverse", e.Message);
        Assert.Contains("does not exist", Assert.Throws<FileNotFoundException>(() => EvalTask.Resolve("missing/task.jsonl")).Message);
    }

    [Fact]
    public void AMissingModelFolderIsNamed()
    {
        var e = Assert.Throws<DirectoryNotFoundException>(() => HfModelFolder.Load("/nonexistent/model"));
        Assert.Contains("Model folder '/nonexistent/model' does not exist", e.Message);
    }
}
