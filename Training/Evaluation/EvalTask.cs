// An evaluation task read from a JSONL file: one example a line, every line of one kind. Not a scorer, not a metric.
//
// Line shapes (the kind is told by the keys; "id" is allowed and ignored):
//   multiple choice  {"context": "...", "choices": [" a", " b", ...], "gold": 1}
//   cloze            {"context": "...", "target": " word"}
//   perplexity       {"text": "..."}
// Continuations are appended to the context as written: a choice or target carries its own leading space or newline.
using System.Text.Json;

namespace DeepSeekCluster.Training.Harness;

public enum TaskKind { MultipleChoice, Cloze, Perplexity }

/// <summary>One example; <see cref="Line"/> is its 1-based line in the file, for error messages.</summary>
public sealed record EvalExample(int Line, string Context, IReadOnlyList<string> Choices, int Gold, string? Text = null);

public sealed record EvalTask(string Name, TaskKind Kind, string Path, IReadOnlyList<EvalExample> Examples)
{
    /// <summary>Where the shipped tasks live in the repository, and beside the binaries (Training.csproj copies them).</summary>
    public const string RepositoryFolder = "data/tasks";
    public const string OutputFolder = "tasks";

    /// <summary>The first <paramref name="limit"/> examples (lm-evaluation-harness's --limit); all of them when 0.</summary>
    public EvalTask Limited(int limit) => limit <= 0 || limit >= Examples.Count ? this : this with { Examples = Examples.Take(limit).ToList() };

    /// <summary>
    /// A task by file path (anything ending in .jsonl or holding a slash) or by name: NAME.jsonl in
    /// <paramref name="folder"/>, else in the shipped tasks folder.
    /// </summary>
    public static EvalTask Resolve(string nameOrPath, string? folder = null)
    {
        if (nameOrPath.EndsWith(".jsonl", StringComparison.Ordinal) || nameOrPath.Contains('/'))
            return Load(nameOrPath);
        var dir = folder ?? LocateShipped();
        var path = System.IO.Path.Combine(dir, nameOrPath + ".jsonl");
        if (File.Exists(path)) return Load(path);
        var known = Directory.Exists(dir) ? Directory.EnumerateFiles(dir, "*.jsonl").Select(f => System.IO.Path.GetFileNameWithoutExtension(f)).Order().ToList() : [];
        throw new ArgumentException($"unknown task '{nameOrPath}': expected a .jsonl file or one of {string.Join(", ", known)} (the tasks in {dir})");
    }

    /// <summary>The shipped tasks: beside the binaries, else data/tasks in a folder above them.</summary>
    public static string LocateShipped()
    {
        var beside = System.IO.Path.Combine(AppContext.BaseDirectory, OutputFolder);
        if (Directory.Exists(beside)) return beside;
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = System.IO.Path.Combine(dir.FullName, RepositoryFolder);
            if (Directory.Exists(candidate)) return candidate;
        }
        throw new DirectoryNotFoundException($"The shipped tasks were not found: neither '{beside}' nor '{RepositoryFolder}' above '{AppContext.BaseDirectory}'. Give task files by path.");
    }

    /// <summary>Reads a task file; the task's name is the file's name without .jsonl.</summary>
    public static EvalTask Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"Task file '{path}' does not exist.", path);
        var examples = new List<EvalExample>();
        TaskKind? kind = null;
        int lineNo = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            var (k, example) = ParseLine(line, path, lineNo);
            if (kind is { } first && first != k)
                throw new InvalidDataException($"{path}:{lineNo}: a {Describe(k)} line in a {Describe(first)} task (every line of a task file has the same kind)");
            kind = k;
            examples.Add(example);
        }
        if (kind is null) throw new InvalidDataException($"{path}: the task file holds no example");
        return new EvalTask(System.IO.Path.GetFileNameWithoutExtension(path), kind.Value, path, examples);
    }

    static (TaskKind, EvalExample) ParseLine(string line, string path, int lineNo)
    {
        string Where() => $"{path}:{lineNo}";
        JsonElement root;
        try { root = JsonDocument.Parse(line).RootElement; }
        catch (JsonException e) { throw new InvalidDataException($"{Where()}: not a JSON object ({e.Message})", e); }
        if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{Where()}: expected a JSON object, found a {root.ValueKind}");
        foreach (var p in root.EnumerateObject())
            if (p.Name is not ("context" or "choices" or "gold" or "target" or "text" or "id"))
                throw new InvalidDataException($"{Where()}: unknown key \"{p.Name}\" (expected context + choices + gold, context + target, or text)");

        string Str(string key)
        {
            if (!root.TryGetProperty(key, out var v) || v.ValueKind != JsonValueKind.String)
                throw new InvalidDataException($"{Where()}: \"{key}\" must be a string");
            return v.GetString()!;
        }
        string NonEmpty(string key) => Str(key) is { Length: > 0 } s ? s : throw new InvalidDataException($"{Where()}: \"{key}\" is empty");

        if (root.TryGetProperty("text", out _))
        {
            if (root.TryGetProperty("context", out _)) throw new InvalidDataException($"{Where()}: a perplexity line has \"text\" only, not \"context\"");
            return (TaskKind.Perplexity, new EvalExample(lineNo, "", [], 0, NonEmpty("text")));
        }
        var context = Str("context");
        if (root.TryGetProperty("target", out _))
        {
            if (root.TryGetProperty("choices", out _)) throw new InvalidDataException($"{Where()}: a line has either \"target\" (cloze) or \"choices\" (multiple choice), not both");
            return (TaskKind.Cloze, new EvalExample(lineNo, context, [NonEmpty("target")], 0));
        }
        if (!root.TryGetProperty("choices", out var choicesJson) || choicesJson.ValueKind != JsonValueKind.Array || choicesJson.GetArrayLength() < 2)
            throw new InvalidDataException($"{Where()}: expected \"choices\" (an array of at least 2 strings), \"target\" or \"text\"");
        var choices = new List<string>();
        foreach (var c in choicesJson.EnumerateArray())
        {
            if (c.ValueKind != JsonValueKind.String || c.GetString() is not { Length: > 0 } s)
                throw new InvalidDataException($"{Where()}: \"choices\"[{choices.Count}] must be a non-empty string");
            choices.Add(s);
        }
        if (!root.TryGetProperty("gold", out var goldJson) || !goldJson.TryGetInt32(out int gold) || gold < 0 || gold >= choices.Count)
            throw new InvalidDataException($"{Where()}: \"gold\" must be an integer index into \"choices\" (0 to {choices.Count - 1})");
        return (TaskKind.MultipleChoice, new EvalExample(lineNo, context, choices, gold));
    }

    static string Describe(TaskKind k) => k switch
    {
        TaskKind.MultipleChoice => "multiple-choice", TaskKind.Cloze => "cloze", _ => "perplexity",
    };
}
