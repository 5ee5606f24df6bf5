// The server's deepseek_serving_* instruments (docs/metrics.md), every one labelled by model_version.
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using DeepSeekCluster.ModelServer.Engine;

namespace DeepSeekCluster.ModelServer.Metrics;

public sealed class ServingMetrics : IDisposable
{
    public const string MeterName = "DeepSeekCluster.Serving";

    /// <summary>From a millisecond to two minutes, dense where P50 and P99 of first-token and per-token times fall on a CPU.</summary>
    static readonly double[] LatencyBuckets = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60, 120];

    readonly Meter meter;
    readonly Counter<long> requests, promptTokens, outputTokens;
    readonly Histogram<double> timeToFirstToken, timePerOutputToken;
    readonly ConcurrentDictionary<InferenceEngine, byte> engines = new();

    public ServingMetrics(IMeterFactory? factory = null)
    {
        meter = factory?.Create(MeterName) ?? new Meter(MeterName);
        requests = meter.CreateCounter<long>("deepseek.serving.requests", "{request}", "Finished API requests by HTTP status");
        promptTokens = meter.CreateCounter<long>("deepseek.serving.prompt_tokens", "{token}", "Prompt tokens prefilled");
        outputTokens = meter.CreateCounter<long>("deepseek.serving.output_tokens", "{token}", "Tokens generated");
        var buckets = new InstrumentAdvice<double> { HistogramBucketBoundaries = LatencyBuckets };
        timeToFirstToken = meter.CreateHistogram<double>("deepseek.serving.time_to_first_token", "s",
            "From a request's acceptance to its first generated token", tags: null, advice: buckets);
        timePerOutputToken = meter.CreateHistogram<double>("deepseek.serving.time_per_output_token", "s",
            "Between two consecutive generated tokens of one request", tags: null, advice: buckets);
        meter.CreateObservableGauge("deepseek.serving.running", () => Each(e => e.Running), "{request}", "Requests in the batch (prefilling or decoding)");
        meter.CreateObservableGauge("deepseek.serving.waiting", () => Each(e => e.Waiting), "{request}", "Accepted requests waiting for a batch slot or cache blocks");
        meter.CreateObservableGauge("deepseek.serving.cache_blocks_used", () => Each(e => e.Pool.BlocksInUse), "{block}", "Latent cache blocks held by requests");
        meter.CreateObservableGauge("deepseek.serving.cache_blocks", () => Each(e => e.Pool.BlockCount), "{block}", "Latent cache blocks in the preallocated pool");
    }

    IEnumerable<Measurement<int>> Each(Func<InferenceEngine, int> value) =>
        engines.Keys.Select(e => new Measurement<int>(value(e), new KeyValuePair<string, object?>("model_version", e.Version)));

    public void Observe(InferenceEngine engine)
    {
        engines[engine] = 0;
        // Start every series of the version at 0 so the first events show as increases (docs/metrics.md).
        var tags = Version(engine.Version);
        promptTokens.Add(0, tags);
        outputTokens.Add(0, tags);
    }

    public void Forget(InferenceEngine engine) => engines.TryRemove(engine, out _);

    static TagList Version(string version) => new() { { "model_version", version } };

    public void Request(string version, int status) => requests.Add(1, new TagList { { "model_version", version }, { "status", status.ToString(System.Globalization.CultureInfo.InvariantCulture) } });
    public void PromptTokens(string version, long count) => promptTokens.Add(count, Version(version));
    public void OutputTokens(string version, long count) => outputTokens.Add(count, Version(version));
    public void FirstToken(string version, double seconds) => timeToFirstToken.Record(seconds, Version(version));
    public void NextToken(string version, double seconds) => timePerOutputToken.Record(seconds, Version(version));

    public void Dispose() => meter.Dispose();
}
