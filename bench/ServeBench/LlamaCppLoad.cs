// The same load on llama.cpp (LLamaSharp's BatchedExecutor: one llama_decode per step for all sequences) on a GGUF file.
using System.Diagnostics;
using LLama;
using LLama.Batched;
using LLama.Common;
using LLama.Native;
using LLama.Sampling;

namespace DeepSeekCluster.ServeBench;

public static class LlamaCppLoad
{
    /// <summary>
    /// Rounds of <paramref name="concurrency"/> conversations started together (static batches: llama.cpp's batched
    /// executor has no admission queue), each with its random prompt ids, greedy, exactly <paramref name="outputTokens"/>.
    /// </summary>
    public static async Task<LoadResult> RunAsync(string gguf, int concurrency, int rounds, int promptTokens, int outputTokens, int seed)
    {
        var parameters = new ModelParams(gguf)
        {
            ContextSize = (uint)(concurrency * (promptTokens + outputTokens + 8)), SeqMax = (uint)concurrency,
            BatchSize = (uint)Math.Max(512, concurrency * promptTokens), Threads = Environment.ProcessorCount, GpuLayerCount = 0,
        };
        using var weights = LLamaWeights.LoadFromFile(parameters);
        int vocab = weights.Vocab.Count;
        var random = new Random(seed);
        var ttft = new List<double>();
        var tpot = new List<double>();
        long tokens = 0;
        var clock = Stopwatch.StartNew();
        for (int round = 0; round < rounds; round++)
        {
            using var executor = new BatchedExecutor(weights, parameters);
            var sampler = new GreedySamplingPipeline();
            var started = Stopwatch.GetTimestamp();
            var conversations = Enumerable.Range(0, concurrency).Select(_ =>
            {
                var c = executor.Create();
                c.Prompt(Enumerable.Range(0, promptTokens).Select(_ => (LLamaToken)random.Next(3, vocab)).ToArray().AsSpan());
                return c;
            }).ToList();
            var first = new long[concurrency];
            for (int step = 0; step < outputTokens; step++)
            {
                var status = await executor.Infer();
                if (status != DecodeResult.Ok) throw new InvalidOperationException($"llama.cpp decode failed: {status}");
                for (int i = 0; i < concurrency; i++)
                {
                    var token = sampler.Sample(executor.Context.NativeHandle, conversations[i].GetSampleIndex());
                    if (step == 0) first[i] = Stopwatch.GetTimestamp();
                    conversations[i].Prompt(token);
                    tokens++;
                }
            }
            var end = Stopwatch.GetTimestamp();
            for (int i = 0; i < concurrency; i++)
            {
                ttft.Add(Stopwatch.GetElapsedTime(started, first[i]).TotalSeconds);
                tpot.Add(Stopwatch.GetElapsedTime(first[i], end).TotalSeconds / Math.Max(1, outputTokens - 1));
            }
            foreach (var c in conversations) c.Dispose();
        }
        double seconds = clock.Elapsed.TotalSeconds;
        return new LoadResult(concurrency, concurrency * rounds, seconds, tokens / seconds,
            EngineLoad.Percentile(ttft, 0.5), EngineLoad.Percentile(ttft, 0.99), EngineLoad.Percentile(tpot, 0.5), EngineLoad.Percentile(tpot, 0.99));
    }
}
