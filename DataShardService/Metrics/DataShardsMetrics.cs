// The service's OpenTelemetry instruments: samples and bytes served, shard cache hits and misses, prepare throughput.
using System.Diagnostics.Metrics;
using DeepSeekCluster.ServiceDefaults;

namespace DeepSeekCluster.DataShardService.Metrics;

/// <summary>
/// Naming: OpenTelemetry style, dotted names with UCUM units; the Prometheus exporter turns a counter into
/// snake case plus "_total", and adds the unit unless the name already holds it ("{...}" units are annotations
/// and add nothing). So on /metrics these read:
///   deepseek.data.samples_served  {sample}  → deepseek_data_samples_served_total
///   deepseek.data.bytes_served    By        → deepseek_data_bytes_served_total
///   deepseek.data.cache_hits      {shard}   → deepseek_data_cache_hits_total
///   deepseek.data.cache_misses    {shard}   → deepseek_data_cache_misses_total
///   deepseek.data.prepared_bytes  By        → deepseek_data_prepared_bytes_total
///   deepseek.data.prepare_megabytes_per_second  MBy/s → deepseek_data_prepare_megabytes_per_second (gauge)
///   deepseek.data.auth_refusals   {request} → deepseek_data_auth_refusals_total{surface="tls"|"grpc",reason}
/// The meter comes from the host's IMeterFactory, so each host (and each test) has its own instruments;
/// ServiceDefaults exports it with AddMeter(DataShardsMetrics.MeterName).
/// </summary>
public sealed class DataShardsMetrics
{
    public const string MeterName = "DeepSeekCluster.DataShards";

    private readonly Counter<long> _samplesServed;
    private readonly Counter<long> _bytesServed;
    private readonly Counter<long> _cacheHits;
    private readonly Counter<long> _cacheMisses;
    private readonly Counter<long> _preparedBytes;
    private readonly Gauge<double> _prepareThroughput;
    private readonly AuthRefusals _authRefusals;

    public DataShardsMetrics(IMeterFactory meterFactory)
    {
        var meter = meterFactory.Create(MeterName);
        _samplesServed = meter.CreateCounter<long>("deepseek.data.samples_served", "{sample}", "Samples streamed by GetBatch.");
        _bytesServed = meter.CreateCounter<long>("deepseek.data.bytes_served", "By", "Token bytes of the samples streamed by GetBatch, as stored in the shards.");
        _cacheHits = meter.CreateCounter<long>("deepseek.data.cache_hits", "{shard}", "Shards opened from a verified local cached copy.");
        _cacheMisses = meter.CreateCounter<long>("deepseek.data.cache_misses", "{shard}", "Shards downloaded from blob storage (no cached copy, or a corrupt one).");
        // Exported as 0 from the start, so a hit ratio and "shards opened" read 0 rather than "no data" before the first hit.
        _cacheHits.Add(0);
        _cacheMisses.Add(0);
        _preparedBytes = meter.CreateCounter<long>("deepseek.data.prepared_bytes", "By", "Raw UTF-8 text bytes read by completed prepare runs.");
        _prepareThroughput = meter.CreateGauge<double>("deepseek.data.prepare_megabytes_per_second", "MBy/s", "Raw text MB (10^6 bytes) per second of the last completed prepare run, all stages.");
        _authRefusals = new AuthRefusals(meter.CreateCounter<long>("deepseek.data.auth_refusals", "{request}", AuthRefusals.Description));
    }

    /// <summary>A client refused in the TLS handshake (<see cref="ClusterTlsEndpoint"/>), by reason.</summary>
    public void AuthRefused(string reason) => _authRefusals.TlsRefused(reason);

    /// <summary>A call refused for its cluster token (<see cref="ClusterTokenGate"/>), by reason.</summary>
    public void TokenRefused(string reason) => _authRefusals.TokenRefused(reason);


    public void SamplesServed(long samples, long bytes)
    {
        _samplesServed.Add(samples);
        _bytesServed.Add(bytes);
    }

    public void CacheHit() => _cacheHits.Add(1);

    public void CacheMiss() => _cacheMisses.Add(1);

    public void PrepareCompleted(long rawBytes, TimeSpan elapsed)
    {
        _preparedBytes.Add(rawBytes);
        _prepareThroughput.Record(rawBytes / 1e6 / Math.Max(elapsed.TotalSeconds, 1e-9));
    }
}
