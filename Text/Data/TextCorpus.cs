// Reads training text: .txt / .txt.gz files or folders of them; documents are separated by empty lines.
using System.IO.Compression;
using System.Text;

namespace DeepSeekCluster.Text.Data;

public static class TextCorpus
{
    /// <summary>
    /// Streams documents from the given files or folders (recursively, *.txt and *.txt.gz). A document is a run of
    /// non-empty lines; the shipped corpus uses the same convention (one chapter per document).
    /// </summary>
    public static IEnumerable<string> Documents(IEnumerable<string> paths)
    {
        foreach (var file in Files(paths))
        {
            using var stream = OpenText(file);
            var doc = new StringBuilder();
            int lineNo = 0;
            while (true)
            {
                string? line;
                try { line = stream.ReadLine(); }
                catch (DecoderFallbackException e) { throw new InvalidDataException($"{file}: line {lineNo + 1} is not valid UTF-8 ({e.Message})", e); }
                catch (InvalidDataException e) { throw new InvalidDataException($"{file}: corrupt gzip data ({e.Message})", e); }
                lineNo++;
                if (line is null || line.Length == 0)
                {
                    if (doc.Length > 0) { yield return doc.ToString(); doc.Clear(); }
                    if (line is null) break;
                    continue;
                }
                if (doc.Length > 0) doc.Append('\n');
                doc.Append(line);
            }
        }
    }

    static StreamReader OpenText(string file)
    {
        Stream s = File.OpenRead(file);
        if (file.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)) s = new GZipStream(s, CompressionMode.Decompress);
        return new StreamReader(s, new UTF8Encoding(false, throwOnInvalidBytes: true));
    }

    static IEnumerable<string> Files(IEnumerable<string> paths)
    {
        bool any = false;
        foreach (var path in paths)
        {
            if (File.Exists(path)) { any = true; yield return path; }
            else if (Directory.Exists(path))
            {
                var files = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories)
                    .Where(f => f.EndsWith(".txt", StringComparison.OrdinalIgnoreCase) || f.EndsWith(".txt.gz", StringComparison.OrdinalIgnoreCase))
                    .Order(StringComparer.Ordinal).ToList();
                if (files.Count == 0) throw new FileNotFoundException($"Data folder '{path}' holds no .txt or .txt.gz file.");
                any = true;
                foreach (var f in files) yield return f;
            }
            else throw new FileNotFoundException($"Data path '{path}' does not exist.", path);
        }
        if (!any) throw new ArgumentException("No data paths given.");
    }
}
