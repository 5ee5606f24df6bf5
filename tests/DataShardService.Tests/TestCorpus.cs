// Small inputs written to temporary folders: chapters of the shipped corpus, plus hand-made bad files.
using System.IO.Compression;
using System.Text;
using System.Text.Json;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.DataShardService.Tests;

public static class TestCorpus
{
    private static readonly Lazy<string[]> Chapters = new(() => ShippedCorpus.Documents().Take(120).ToArray());

    public static IReadOnlyList<string> FirstChapters(int count) => Chapters.Value.Take(count).ToArray();

    public static string NewFolder(string name)
    {
        string dir = Path.Combine(Path.GetTempPath(), "dss-tests", $"{name}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>Documents separated by empty lines, as the shipped corpus is.</summary>
    public static string WritePlain(string folder, string fileName, IEnumerable<string> docs)
    {
        string path = Path.Combine(folder, fileName);
        File.WriteAllText(path, string.Join("\n\n", docs) + "\n", new UTF8Encoding(false));
        return path;
    }

    public static string WriteJsonLinesGz(string folder, string fileName, string field, IEnumerable<string> docs)
    {
        string path = Path.Combine(folder, fileName);
        using var gz = new GZipStream(File.Create(path), CompressionLevel.Fastest);
        using var w = new StreamWriter(gz, new UTF8Encoding(false));
        foreach (string doc in docs)
            w.WriteLine(JsonSerializer.Serialize(new Dictionary<string, string> { [field] = doc }));
        return path;
    }

    /// <summary>The text with every <paramref name="every"/>-th word replaced: a near-duplicate.</summary>
    public static string ChangeWords(string text, int every)
    {
        var words = text.Split(' ');
        for (int i = every / 2; i < words.Length; i += every)
            words[i] = "changed" + i;
        return string.Join(' ', words);
    }

    public static PrepareRequest Request(int seqLen, int vocab, int samplesPerShard, params Source[] sources)
    {
        var request = new PrepareRequest
        {
            SeqLen = seqLen,
            VocabSize = vocab,
            SamplesPerShard = samplesPerShard,
            ValidationFraction = 0.1,
        };
        request.Sources.AddRange(sources);
        return request;
    }
}
