// Runs a GGUF file in the real llama.cpp that LLamaSharp ships (CPU backend): tokenize, per-position logits, greedy decoding.
using System.Text;
using LLama;
using LLama.Common;
using LLama.Native;

namespace DeepSeekCluster.Training.Tests.Export;

public sealed class LlamaCpp : IDisposable
{
    readonly LLamaWeights _weights;
    readonly LLamaContext _context;
    public int VocabSize { get; }

    // llama.cpp logs every tensor it loads; only errors are worth a test's output.
    static LlamaCpp() => NativeLogConfig.llama_log_set((level, message) =>
    {
        if (level == LLamaLogLevel.Error) Console.Error.Write(message);
    });

    public LlamaCpp(string ggufPath, uint contextSize = 256)
    {
        var parameters = new ModelParams(ggufPath)
        {
            ContextSize = contextSize, BatchSize = contextSize, UBatchSize = contextSize, GpuLayerCount = 0, Threads = 2,
        };
        _weights = LLamaWeights.LoadFromFile(parameters);
        _context = _weights.CreateContext(parameters);
        VocabSize = _weights.Vocab.Count;
    }

    public IReadOnlyDictionary<string, string> Metadata => _weights.Metadata;

    public int[] Tokenize(string text) =>
        _context.NativeHandle.Tokenize(text, add_bos: false, special: false, Encoding.UTF8).Select(t => (int)t).ToArray();

    /// <summary>Logits (T, V) for every position of <paramref name="tokens"/>, decoded from an empty cache.</summary>
    public float[][] Logits(IReadOnlyList<int> tokens)
    {
        _context.NativeHandle.MemoryClear(true);
        var batch = new LLamaBatch();
        for (int i = 0; i < tokens.Count; i++) batch.Add(tokens[i], i, LLamaSeqId.Zero, true);
        Decode(batch);
        return Enumerable.Range(0, tokens.Count).Select(i => _context.NativeHandle.GetLogitsIth(i).ToArray()).ToArray();
    }

    /// <summary>Greedy continuation through llama.cpp's own cache: the prompt once, then one token per step.</summary>
    public int[] Greedy(IReadOnlyList<int> prompt, int newTokens)
    {
        _context.NativeHandle.MemoryClear(true);
        var batch = new LLamaBatch();
        for (int i = 0; i < prompt.Count; i++) batch.Add(prompt[i], i, LLamaSeqId.Zero, i == prompt.Count - 1);
        Decode(batch);
        var produced = new List<int>();
        int position = prompt.Count;
        for (int step = 0; step < newTokens; step++)
        {
            var logits = _context.NativeHandle.GetLogitsIth(batch.TokenCount - 1);
            int next = ArgMax(logits);
            produced.Add(next);
            batch.Clear();
            batch.Add(next, position++, LLamaSeqId.Zero, true);
            Decode(batch);
        }
        return produced.ToArray();
    }

    void Decode(LLamaBatch batch)
    {
        var result = _context.NativeHandle.Decode(batch);
        if (result != DecodeResult.Ok) throw new InvalidOperationException($"llama_decode failed: {result}");
    }

    public static int ArgMax(ReadOnlySpan<float> x)
    {
        int best = 0;
        for (int i = 1; i < x.Length; i++) if (x[i] > x[best]) best = i;
        return best;
    }

    public void Dispose()
    {
        _context.Dispose();
        _weights.Dispose();
    }
}
