// Streams the documents of one source: plain text (documents separated by empty lines, or one per file) or
// JSONL with a chosen text field, each optionally gzip-compressed. Strict UTF-8; errors name file and line.
using System.IO.Compression;
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>One input file of a source: where it is and the name it has in the manifest.</summary>
public sealed record SourceFile(string FullPath, string RelativePath);

public static class SourceReader
{
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The files of a source in ordinal order of their relative paths (so the order never depends on the file system).</summary>
    public static IReadOnlyList<SourceFile> Files(SourceSpec source)
    {
        if (File.Exists(source.Path))
            return [new SourceFile(Path.GetFullPath(source.Path), Path.GetFileName(source.Path))];
        if (!Directory.Exists(source.Path))
            throw new DataInputException(DataErrorKind.NotFound,
                $"Source '{source.Name}': '{source.Path}' does not exist (expected a file or a folder).");
        string root = Path.GetFullPath(source.Path);
        var files = Directory.EnumerateFiles(root, "*", SearchOption.AllDirectories)
            .Select(f => new SourceFile(f, Path.GetRelativePath(root, f).Replace('\\', '/')))
            .OrderBy(f => f.RelativePath, StringComparer.Ordinal)
            .ToList();
        if (files.Count == 0)
            throw DataInputException.Invalid($"Source '{source.Name}': folder '{source.Path}' holds no files.");
        return files;
    }

    public static bool IsJsonLines(string path)
    {
        string name = path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase) ? path[..^3] : path;
        return name.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase)
            || name.EndsWith(".ndjson", StringComparison.OrdinalIgnoreCase)
            || name.EndsWith(".json", StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>The raw documents of one file, in file order.</summary>
    public static IEnumerable<string> Documents(SourceSpec source, SourceFile file)
    {
        if (IsJsonLines(file.FullPath))
            return JsonLinesDocuments(source, file);
        return source.WholeFile ? WholeFileDocument(source, file) : BlankLineDocuments(source, file);
    }

    private static IEnumerable<string> JsonLinesDocuments(SourceSpec source, SourceFile file)
    {
        foreach (var (number, line) in Lines(source, file))
        {
            if (string.IsNullOrWhiteSpace(line))
                continue;
            string? text;
            try
            {
                using var json = JsonDocument.Parse(line);
                text = json.RootElement.ValueKind == JsonValueKind.Object
                    && json.RootElement.TryGetProperty(source.TextField, out var field)
                    && field.ValueKind == JsonValueKind.String ? field.GetString() : null;
            }
            catch (JsonException e)
            {
                throw DataInputException.Invalid(
                    $"Source '{source.Name}': {file.FullPath} line {number} is not JSON ({e.Message}).");
            }
            if (text is null)
                throw DataInputException.Invalid(
                    $"Source '{source.Name}': {file.FullPath} line {number} has no string field '{source.TextField}'.");
            yield return text;
        }
    }

    private static IEnumerable<string> BlankLineDocuments(SourceSpec source, SourceFile file)
    {
        var doc = new StringBuilder();
        foreach (var (_, line) in Lines(source, file))
        {
            if (line.Length == 0)
            {
                if (doc.Length > 0)
                    yield return doc.ToString();
                doc.Clear();
                continue;
            }
            if (doc.Length > 0)
                doc.Append('\n');
            doc.Append(line);
        }
        if (doc.Length > 0)
            yield return doc.ToString();
    }

    private static IEnumerable<string> WholeFileDocument(SourceSpec source, SourceFile file)
    {
        var doc = new StringBuilder();
        foreach (var (_, line) in Lines(source, file))
            doc.Append(line).Append('\n');
        if (doc.Length > 0)
            yield return doc.ToString();
    }

    /// <summary>Lines without their terminator ("\n" or "\r\n"), numbered from 1; a leading BOM is skipped.</summary>
    private static IEnumerable<(long Number, string Text)> Lines(SourceSpec source, SourceFile file)
    {
        // Decoding line by line (not a StreamReader's buffer at a time) is what lets an error name the exact line.
        using var stream = Open(file.FullPath);
        var buffer = new byte[1 << 16];
        var line = new List<byte>(256);
        long number = 0;
        bool first = true;
        int read;
        while ((read = stream.Read(buffer, 0, buffer.Length)) > 0)
        {
            int start = 0;
            if (first)
            {
                first = false;
                if (read >= 3 && buffer[0] == 0xEF && buffer[1] == 0xBB && buffer[2] == 0xBF)
                    start = 3;
            }
            while (start < read)
            {
                int nl = Array.IndexOf(buffer, (byte)'\n', start, read - start);
                if (nl < 0)
                {
                    line.AddRange(new ArraySegment<byte>(buffer, start, read - start));
                    break;
                }
                line.AddRange(new ArraySegment<byte>(buffer, start, nl - start));
                yield return (++number, Decode(source, file, line, number));
                line.Clear();
                start = nl + 1;
            }
        }
        if (line.Count > 0)
            yield return (++number, Decode(source, file, line, number));
    }

    private static string Decode(SourceSpec source, SourceFile file, List<byte> line, long number)
    {
        var bytes = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(line);
        if (bytes.Length > 0 && bytes[^1] == (byte)'\r')
            bytes = bytes[..^1];
        try
        {
            return StrictUtf8.GetString(bytes);
        }
        catch (DecoderFallbackException)
        {
            throw DataInputException.Invalid(
                $"Source '{source.Name}': {file.FullPath} line {number} is not valid UTF-8.");
        }
    }

    private static Stream Open(string path)
    {
        Stream raw = File.OpenRead(path);
        return path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)
            ? new GZipStream(raw, CompressionMode.Decompress)
            : raw;
    }
}
