// The worker's checkpoint, validation and device-memory instruments: what each call records, under which labels, and the
// tensor arithmetic behind deepseek_train_device_memory_bytes.
using System.Diagnostics.Metrics;
using DeepSeekCluster.GpuWorker.Cluster;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Tests;

public class TrainingMetricsTests
{
    [Fact]
    public void TheDeviceStateIsEveryStateTensorPlusAGradientPerTrainableParameter()
    {
        using var weights = zeros(3, 4, dtype: ScalarType.Float32);   // 12 × 4 bytes
        using var moments = zeros(5, dtype: ScalarType.Float64);      // 5 × 8 bytes
        using var trainable = new TorchSharp.Modules.Parameter(zeros(2, 2, dtype: ScalarType.Float32)); // a 4 × 4-byte gradient
        using var frozen = new TorchSharp.Modules.Parameter(zeros(3, dtype: ScalarType.Float32), requires_grad: false); // none
        Assert.Equal(48 + 40 + 16, TrainingMetrics.TrainingStateBytes([weights, moments], [trainable, frozen]));
    }

    [Fact]
    public void CheckpointCallsRecordTimesAndBytesByDirectionForTheJobAndWorker()
    {
        string job = "job-" + Guid.NewGuid().ToString("N")[..8];
        var seen = new List<(string Instrument, double Value, Dictionary<string, string> Tags)>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) => { if (instrument.Meter.Name == TrainingMetrics.MeterName) l.EnableMeasurementEvents(instrument); };
        void Seen(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var t = new Dictionary<string, string>();
            foreach (var kv in tags) t[kv.Key] = kv.Value?.ToString() ?? "";
            if (t.GetValueOrDefault("training_job") == job) lock (seen) seen.Add((instrument.Name, value, t));
        }
        listener.SetMeasurementEventCallback<double>((i, v, tags, _) => Seen(i, v, tags));
        listener.SetMeasurementEventCallback<long>((i, v, tags, _) => Seen(i, v, tags));
        listener.Start();

        using var metrics = new TrainingMetrics();
        metrics.CheckpointRunStarted(job, "w0");
        metrics.CheckpointSnapshot(job, "w0", TimeSpan.FromMilliseconds(250));
        metrics.CheckpointSaved(job, "w0", TimeSpan.FromSeconds(1.5), 1000);
        metrics.CheckpointLoaded(job, "w0", TimeSpan.FromSeconds(3), 4000);
        metrics.ValidationLoss(job, "w0", 4.25);
        metrics.DeviceMemory(job, "w0", 123_456);

        Assert.All(seen, s => Assert.Equal("w0", s.Tags["worker"]));
        Assert.Equal(
            [
                ("deepseek.checkpoint.bytes", 0, "save"), ("deepseek.checkpoint.bytes", 0, "load"),
                ("deepseek.checkpoint.snapshot", 0.25, ""),
                ("deepseek.checkpoint.save", 1.5, ""), ("deepseek.checkpoint.bytes", 1000, "save"),
                ("deepseek.checkpoint.load", 3, ""), ("deepseek.checkpoint.bytes", 4000, "load"),
                ("deepseek.train.validation_loss", 4.25, ""), ("deepseek.train.device_memory", 123_456, ""),
            ],
            seen.Select(s => (s.Instrument, s.Value, s.Tags.GetValueOrDefault("direction", ""))));
    }
}
