// Preparation streams: a generated corpus several times the process's managed-heap limit is prepared whole
// by the real `prepare` process under that limit (a run that held the text would die of OutOfMemoryException).
using System.IO.Compression;
using System.Text;
using DeepSeekCluster.DataShardService.Preparation;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class StreamingMemoryTests
{
    private const int Documents = 1800;
    private const int WordsPerDocument = 12_000;   // about 84 KB a document: 150 MB of text in all
    // The streaming run's managed heap stays near 30 MB whatever the corpus size; a 32 MB cap left no margin (a CI run
    // died of OutOfMemoryException in the half-size run), so the cap is 48 MB and the corpus three times that.
    private const long HeapLimit = 48L << 20;

    [Fact]
    public async Task ACorpusThreeTimesTheHeapLimitIsPreparedWholeUnderThatLimit()
    {
        var half = await PrepareGeneratedAsync(Documents / 2);
        var big = await PrepareGeneratedAsync(Documents);
        Assert.True(big.RawBytes > 2.9 * HeapLimit, $"{big.RawBytes} bytes");
        Assert.Equal(Documents, big.Manifest.Report.DocumentsPacked); // every document was read and packed
        Assert.Equal(Documents, big.Manifest.Report.Dedup.Kept);
        // Resident memory of the whole process (runtime, JIT, ICU, native buffers included) does not scale with the text:
        // twice the text adds under 16 MB (measured: 96–98 MB at both sizes). The baseline is the half-size run, not a
        // tiny one: the peak is read from /proc while the process runs, and a run of a second can end before a read
        // sees its peak (a 10-document baseline read 36 MB in one run and 80 MB in others).
        long growth = big.Run.PeakRssBytes - half.Run.PeakRssBytes;
        Assert.True(half.Run.PeakRssBytes > 0 && growth < 16L << 20,
            $"peak RSS {half.Run.PeakRssBytes} for {half.RawBytes} bytes of text, {big.Run.PeakRssBytes} for {big.RawBytes}");
        Assert.Contains(big.Run.Lines, l => l.StartsWith("[prepare] clean+dedup:", StringComparison.Ordinal) && l.Contains("MB/s", StringComparison.Ordinal));
    }

    private static async Task<(PrepareRun Run, DatasetManifest Manifest, long RawBytes)> PrepareGeneratedAsync(int documents)
    {
        string input = TestCorpus.NewFolder("big-input");
        string store = TestCorpus.NewFolder("big-store");
        long rawBytes = Generate(Path.Combine(input, "generated.txt.gz"), documents);

        var settings = new Dictionary<string, string?>
        {
            ["DataShards:WorkDir"] = store + "-work",
            // Workstation GC (the service's Server GC sizes heaps by cores) with a hard cap on the managed heap.
            ["DOTNET_gcServer"] = "0",
            ["DOTNET_GCHeapHardLimit"] = $"0x{HeapLimit:X}",
        };
        var run = await PrepareProcess.RunAsync(settings,
            ["--source", $"generated={input}", "--seq-len", "256", "--vocab-size", "300", "--out", store]);
        // A run that needed more managed memory than the limit would have died of OutOfMemoryException.
        Assert.True(run.ExitCode == 0, run.Output);

        string datasetId = Directory.GetDirectories(store).Select(Path.GetFileName).Single()!;
        var manifest = DatasetManifest.FromJson(await File.ReadAllTextAsync(Path.Combine(store, datasetId, DatasetManifest.FileName)), "test");
        Assert.Equal(rawBytes, manifest.Report.RawBytes); // every byte was read
        Directory.Delete(input, true);
        Directory.Delete(store, true);
        Directory.Delete(store + "-work", true);
        return (run, manifest, rawBytes);
    }

    /// <summary>Documents of words drawn from a 4096-word vocabulary, lines of 12 words; returns the text's UTF-8 bytes.</summary>
    private static long Generate(string path, int documents)
    {
        var random = new Random(20261126);
        var vocabulary = Enumerable.Range(0, 4096).Select(_ =>
            Encoding.ASCII.GetBytes(new string(Enumerable.Range(0, random.Next(3, 10)).Select(_ => (char)('a' + random.Next(26))).ToArray()))).ToArray();
        using var gz = new GZipStream(File.Create(path), CompressionLevel.Fastest);
        using var output = new BufferedStream(gz, 1 << 20);
        long textBytes = 0;
        for (int d = 0; d < documents; d++)
        {
            long docBytes = 0;
            for (int w = 0; w < WordsPerDocument; w++)
            {
                var word = vocabulary[random.Next(vocabulary.Length)];
                output.Write(word);
                docBytes += word.Length;
                byte separator = w == WordsPerDocument - 1 ? (byte)'\n' : (w % 12 == 11 ? (byte)'\n' : (byte)' ');
                output.WriteByte(separator);
                if (w < WordsPerDocument - 1)
                    docBytes++; // the document's text ends at its last word
            }
            output.WriteByte((byte)'\n'); // the blank line between documents
            textBytes += docBytes;
        }
        return textBytes;
    }
}
