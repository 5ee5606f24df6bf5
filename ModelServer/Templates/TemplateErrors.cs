// Errors of the chat-template interpreter: syntax found at load (file, line, column, construct) and refusals while rendering.
namespace DeepSeekCluster.ModelServer.Templates;

/// <summary>A template the interpreter cannot run, found when the model loads; the message names the file, line, column and construct.</summary>
public sealed class TemplateSyntaxException(string source, int line, int column, string message)
    : Exception($"{source}: line {line}, column {column}: {message}")
{
    public string File { get; } = source;
    public int Line { get; } = line;
    public int Column { get; } = column;
}

/// <summary>A template that fails while rendering a request: raise_exception(...), an undefined attribute, a type error.</summary>
public sealed class TemplateRuntimeException(string message) : Exception(message);

/// <summary>Where a construct sits in the template text (1-based), for load-time and render-time messages.</summary>
public readonly record struct Position(int Line, int Column)
{
    public override string ToString() => $"line {Line}, column {Column}";
}
