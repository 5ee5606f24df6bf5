// The error for a tokenizer.json that is malformed or uses a component this tokenizer does not implement.
namespace DeepSeekCluster.Text.Tokenization;

/// <summary>
/// Thrown when a tokenizer.json cannot be applied exactly as Hugging Face `tokenizers` would apply it.
/// The message always names the source (file path) and the offending field or component type, because
/// silently approximating an unknown component would give ids that differ from the reference.
/// </summary>
public sealed class TokenizerFormatException : Exception
{
    public TokenizerFormatException(string source, string message)
        : base($"{source}: {message}")
    {
        Source = source;
    }

    public TokenizerFormatException(string source, string message, Exception inner)
        : base($"{source}: {message}", inner)
    {
        Source = source;
    }
}
