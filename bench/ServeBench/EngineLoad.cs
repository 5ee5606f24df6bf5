// Closed-loop load on one engine: C clients, each sending its requests one after another; latency from the engine's own timestamps.
using System.Diagnostics;
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.ServeBench;

/// <param name="OutputTokensPerSecond">Generated tokens of all requests over the wall time of the whole run.</param>
public sealed record LoadResult(int Concurrency, int Requests, double Seconds, double OutputTokensPerSecond,
    double TtftP50, double TtftP99, double TpotP50, double TpotP99);

public static class EngineLoad
{
    public static async Task<LoadResult> RunAsync(InferenceEngine engine, int concurrency, int requestsPerClient, int promptTokens, int outputTokens, int seed)
    {
        var random = new Random(seed);
        int vocab = engine.VocabSize;
        var prompts = Enumerable.Range(0, concurrency * requestsPerClient)
            .Select(_ => Enumerable.Range(0, promptTokens).Select(_ => random.Next(3, vocab)).ToArray()).ToArray();
        var ttft = new List<double>();
        var tpot = new List<double>();
        long tokens = 0;
        var clock = Stopwatch.StartNew();
        await Task.WhenAll(Enumerable.Range(0, concurrency).Select(c => Task.Run(async () =>
        {
            for (int k = 0; k < requestsPerClient; k++)
            {
                // No EOS: every request generates exactly outputTokens, so the rows are comparable across formats.
                var request = new GenerationRequest(prompts[c * requestsPerClient + k], outputTokens, new SamplingOptions(), -1, null, CancellationToken.None);
                while (!engine.TryEnqueue(request)) await Task.Delay(5);
                int produced = 0;
                await foreach (var ev in request.Events.Reader.ReadAllAsync())
                    if (ev is TokenEvent) produced++;
                    else if (ev is FailedEvent f) throw new InvalidOperationException("generation failed", f.Error);
                lock (ttft)
                {
                    tokens += produced;
                    ttft.Add(Stopwatch.GetElapsedTime(request.EnqueuedAt, request.FirstTokenAt).TotalSeconds);
                    if (produced > 1) tpot.Add(Stopwatch.GetElapsedTime(request.FirstTokenAt, request.FinishedAt).TotalSeconds / (produced - 1));
                }
            }
        })));
        double seconds = clock.Elapsed.TotalSeconds;
        return new LoadResult(concurrency, prompts.Length, seconds, tokens / seconds,
            Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(tpot, 0.5), Percentile(tpot, 0.99));
    }

    /// <summary>Nearest-rank percentile.</summary>
    public static double Percentile(List<double> values, double p)
    {
        if (values.Count == 0) return double.NaN;
        var sorted = values.Order().ToList();
        return sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Count) - 1, 0, sorted.Count - 1)];
    }
}
