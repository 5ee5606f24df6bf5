// Streams the documents of one source: plain text (documents separated by empty lines, or one per file) or
// JSONL with a chosen text field, each optionally gzip-compressed. Strict UTF-8; errors name file and line.
using System.IO.Compression;
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>One input file of a source: where it is and the name it has in the manifest.</summary>
public sealed record SourceFile(string FullPath, string RelativePath);

/// <summary>A document as read: its text, or null when it was too long to hold; and its UTF-8 byte count.</summary>
public readonly record struct RawDocument(string? Text, long Bytes);

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

    /// <summary>
    /// The raw documents of one file, in file order. A document longer than <see cref="HeldChars"/>(max_chars) as
    /// read, or a line longer than <see cref="LineBytes"/>(max_chars), is not held in memory: it comes back with a
    /// null text (counted as too long) and the rest of it is skipped unread, UTF-8 check included. No text that
    /// cleaning could keep is lost that way: NFC composes at most 3 chars into 1, and only control characters and
    /// surrounding whitespace are removed besides.
    /// </summary>
    public static IEnumerable<RawDocument> Documents(SourceSpec source, SourceFile file, int maxChars)
    {
        long heldChars = HeldChars(maxChars);
        int lineBytes = LineBytes(maxChars);
        if (IsJsonLines(file.FullPath))
            return JsonLinesDocuments(source, file, lineBytes);
        return BlankLineDocuments(source, file, heldChars, lineBytes, wholeFile: source.WholeFile);
    }

    internal static long HeldChars(int maxChars) => 4L * maxChars + 1024;

    // A UTF-8 byte gives at least a third of a UTF-16 char, and JSON escapes take at most 6 bytes per char.
    internal static int LineBytes(int maxChars) => (int)Math.Min(Array.MaxLength - 1, 6 * HeldChars(maxChars));

    private static IEnumerable<RawDocument> JsonLinesDocuments(SourceSpec source, SourceFile file, int lineBytes)
    {
        foreach (var (number, line, bytes) in Lines(source, file, lineBytes))
        {
            if (line is null)
            {
                yield return new RawDocument(null, bytes);
                continue;
            }
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
            yield return new RawDocument(text, Encoding.UTF8.GetByteCount(text));
        }
    }

    /// <summary>Documents separated by empty lines, or (<paramref name="wholeFile"/>) the whole file as one.</summary>
    private static IEnumerable<RawDocument> BlankLineDocuments(SourceSpec source, SourceFile file, long heldChars, int lineBytes, bool wholeFile)
    {
        var doc = new StringBuilder();
        bool tooLong = false, any = false;
        long skippedBytes = 0;
        foreach (var (_, line, bytes) in Lines(source, file, lineBytes))
        {
            if (!wholeFile && line is { Length: 0 })
            {
                if (any)
                    yield return Finish();
                continue;
            }
            if (!tooLong && (line is null || doc.Length + line.Length + 1 > heldChars))
            {
                tooLong = true;
                skippedBytes = Encoding.UTF8.GetByteCount(doc.ToString());
                doc.Clear();
            }
            if (tooLong)
            {
                skippedBytes += wholeFile ? bytes + 1 : (any ? 1 : 0) + bytes; // as the held text would have joined it
            }
            else if (wholeFile)
            {
                doc.Append(line).Append('\n');
            }
            else
            {
                if (doc.Length > 0)
                    doc.Append('\n');
                doc.Append(line);
            }
            any = true;
        }
        if (any)
            yield return Finish();

        RawDocument Finish()
        {
            var result = tooLong ? new RawDocument(null, skippedBytes) : Held(doc.ToString());
            doc.Clear();
            tooLong = any = false;
            skippedBytes = 0;
            return result;
        }
    }

    private static RawDocument Held(string text) => new(text, Encoding.UTF8.GetByteCount(text));

    /// <summary>
    /// Lines without their terminator ("\n" or "\r\n"), numbered from 1, with their byte count; a leading BOM is
    /// skipped. A line over <paramref name="maxBytes"/> comes back as null, its bytes counted but not kept.
    /// </summary>
    private static IEnumerable<(long Number, string? Text, long Bytes)> Lines(SourceSpec source, SourceFile file, int maxBytes)
    {
        // Decoding line by line (not a StreamReader's buffer at a time) is what lets an error name the exact line.
        using var stream = Open(file.FullPath);
        var buffer = new byte[1 << 16];
        var line = new List<byte>(256);
        long number = 0, overlong = -1; // overlong: bytes of the current line once it passed maxBytes
        long decompressed = 0;
        bool first = true;
        int read;
        while ((read = Read(source, file, stream, buffer)) > 0)
        {
            decompressed += read;
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
                int end = nl < 0 ? read : nl;
                if (overlong < 0 && line.Count + (end - start) > maxBytes)
                {
                    overlong = line.Count;
                    line.Clear();
                }
                if (overlong >= 0)
                    overlong += end - start;
                else
                    line.AddRange(new ArraySegment<byte>(buffer, start, end - start));
                if (nl < 0)
                    break;
                ++number;
                yield return overlong >= 0 ? (number, null, overlong) : (number, Decode(source, file, line, number), line.Count);
                line.Clear();
                overlong = -1;
                start = nl + 1;
            }
        }
        if (IsGzip(file.FullPath))
            CheckGzipLength(source, file, decompressed);
        if (overlong >= 0)
            yield return (++number, null, overlong);
        else if (line.Count > 0)
            yield return (++number, Decode(source, file, line, number), line.Count);
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

    /// <summary>
    /// GZipStream ends quietly where a file cut short ends, so the length in the gzip trailer (ISIZE, the last 4
    /// bytes, mod 2^32) is compared with what came out. That trailer is the last member's: a file of several
    /// concatenated members is refused too, with a message saying how to make it one.
    /// </summary>
    private static void CheckGzipLength(SourceSpec source, SourceFile file, long decompressed)
    {
        using var raw = File.OpenRead(file.FullPath);
        Span<byte> trailer = stackalloc byte[4];
        if (raw.Length < 18)
            throw DataInputException.Invalid($"Source '{source.Name}': {file.FullPath} is not a readable gzip file ({raw.Length} bytes, shorter than a gzip header and trailer).");
        raw.Seek(-4, SeekOrigin.End);
        raw.ReadExactly(trailer);
        uint size = System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(trailer);
        if (size != (uint)decompressed)
            throw DataInputException.Invalid(
                $"Source '{source.Name}': {file.FullPath} is not a readable gzip file: it decompressed to {decompressed} bytes but its trailer " +
                $"says {size} (mod 2^32), so it was cut short, or it is several gzip members concatenated (then `zcat` it and gzip it again as one).");
    }

    private static bool IsGzip(string path) => path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase);

    private static int Read(SourceSpec source, SourceFile file, Stream stream, byte[] buffer)
    {
        try
        {
            return stream.Read(buffer, 0, buffer.Length);
        }
        catch (InvalidDataException e)
        {
            throw DataInputException.Invalid($"Source '{source.Name}': {file.FullPath} is not a readable gzip file ({e.Message}).");
        }
    }

    private static Stream Open(string path)
    {
        Stream raw = File.OpenRead(path);
        return IsGzip(path)
            ? new GZipStream(raw, CompressionMode.Decompress)
            : raw;
    }
}
