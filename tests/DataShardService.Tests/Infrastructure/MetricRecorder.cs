// Listens to the DataShards instruments of one host (its own IMeterFactory), so parallel tests never see each other's numbers.
using System.Diagnostics.Metrics;
using DeepSeekCluster.DataShardService.Metrics;
using Microsoft.Extensions.DependencyInjection;

namespace DeepSeekCluster.DataShardService.Tests.Infrastructure;

public sealed class MetricRecorder : IDisposable
{
    private readonly MeterListener _listener = new();
    private readonly Dictionary<string, double> _sums = [];
    private readonly Dictionary<string, double> _last = [];

    public MetricRecorder(ServiceHost host)
    {
        var factory = host.Services.GetRequiredService<IMeterFactory>();
        _listener.InstrumentPublished = (instrument, listener) =>
        {
            if (instrument.Meter.Name == DataShardsMetrics.MeterName && ReferenceEquals(instrument.Meter.Scope, factory))
                listener.EnableMeasurementEvents(instrument);
        };
        _listener.SetMeasurementEventCallback<long>((instrument, value, _, _) => Record(instrument.Name, value));
        _listener.SetMeasurementEventCallback<double>((instrument, value, _, _) => Record(instrument.Name, value));
        _listener.Start();
    }

    /// <summary>The sum of everything a counter recorded since this recorder started.</summary>
    public double Sum(string instrument)
    {
        lock (_sums) return _sums.GetValueOrDefault(instrument);
    }

    /// <summary>The last value a gauge recorded, or null.</summary>
    public double? Last(string instrument)
    {
        lock (_sums) return _last.TryGetValue(instrument, out double v) ? v : null;
    }

    private void Record(string instrument, double value)
    {
        lock (_sums)
        {
            _sums[instrument] = _sums.GetValueOrDefault(instrument) + value;
            _last[instrument] = value;
        }
    }

    public void Dispose() => _listener.Dispose();
}
