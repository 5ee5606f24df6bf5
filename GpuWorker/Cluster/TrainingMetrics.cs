// The worker's deepseek_train_*, deepseek_moe_* and deepseek_checkpoint_* instruments (docs/metrics.md): step metrics after
// every step, the validation loss after each evaluation, checkpoint times and bytes where saves and loads happen.
using System.Diagnostics;
using System.Diagnostics.Metrics;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class TrainingMetrics : IDisposable
{
    public const string MeterName = "DeepSeekCluster.Training";

    /// <summary>Seconds from a millisecond to a quarter of an hour: step phases and checkpoint times (docs/metrics.md).</summary>
    static readonly double[] SecondsBuckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000];

    readonly Meter meter = new(MeterName);
    readonly Gauge<double> loss, validationLoss, learningRate, gradNorm, tokensPerSecond, mfu, achievedFlops, peakFlops, expertLoad, imbalance;
    readonly Gauge<long> globalStep, deviceMemory;
    readonly Histogram<double> stepSeconds, snapshotSeconds, saveSeconds, loadSeconds;
    readonly Counter<long> steps, tokens, checkpointBytes, evalTokens;
    readonly Gauge<double> evalAccuracy, evalPerplexity, evalTokensPerSecond;

    public TrainingMetrics()
    {
        loss = meter.CreateGauge<double>("deepseek.train.loss", "{nat}");
        learningRate = meter.CreateGauge<double>("deepseek.train.learning_rate");
        gradNorm = meter.CreateGauge<double>("deepseek.train.grad_norm");
        tokensPerSecond = meter.CreateGauge<double>("deepseek.train.tokens_per_second", "{token}/s");
        mfu = meter.CreateGauge<double>("deepseek.train.mfu_ratio", "1");
        achievedFlops = meter.CreateGauge<double>("deepseek.train.achieved_flops", "{flop}/s");
        peakFlops = meter.CreateGauge<double>("deepseek.train.peak_flops", "{flop}/s");
        globalStep = meter.CreateGauge<long>("deepseek.train.global_step", "{step}");
        stepSeconds = meter.CreateHistogram<double>("deepseek.train.step", "s", "time of one step in each phase", tags: null,
            advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60] });
        steps = meter.CreateCounter<long>("deepseek.train.steps", "{step}");
        tokens = meter.CreateCounter<long>("deepseek.train.tokens", "{token}");
        expertLoad = meter.CreateGauge<double>("deepseek.moe.expert_load_ratio", "1");
        imbalance = meter.CreateGauge<double>("deepseek.moe.load_imbalance_ratio", "1");
        validationLoss = meter.CreateGauge<double>("deepseek.train.validation_loss", "{nat}");
        deviceMemory = meter.CreateGauge<long>("deepseek.train.device_memory", "By");
        var checkpointBuckets = new InstrumentAdvice<double> { HistogramBucketBoundaries = SecondsBuckets };
        snapshotSeconds = meter.CreateHistogram<double>("deepseek.checkpoint.snapshot", "s",
            "Time training waits while a checkpoint's tensors are copied to host memory", tags: null, advice: checkpointBuckets);
        saveSeconds = meter.CreateHistogram<double>("deepseek.checkpoint.save", "s",
            "From the end of the host copy to this rank's shard written, uploaded and reported", tags: null, advice: checkpointBuckets);
        loadSeconds = meter.CreateHistogram<double>("deepseek.checkpoint.load", "s",
            "From the manifest read to this rank's tensors loaded from a committed checkpoint", tags: null, advice: checkpointBuckets);
        checkpointBytes = meter.CreateCounter<long>("deepseek.checkpoint.bytes", "By", "Checkpoint bytes this rank moved (direction: save, load)");
        evalAccuracy = meter.CreateGauge<double>("deepseek.eval.accuracy_ratio", "1", "The last checkpoint evaluation's accuracy per task (metric: acc, acc_norm)");
        evalPerplexity = meter.CreateGauge<double>("deepseek.eval.perplexity", "{perplexity}", "The last checkpoint evaluation's perplexity per task (metric: perplexity, word_perplexity, byte_perplexity)");
        evalTokens = meter.CreateCounter<long>("deepseek.eval.tokens", "{token}", "Tokens this rank scored for evaluation tasks");
        evalTokensPerSecond = meter.CreateGauge<double>("deepseek.eval.tokens_per_second", "{token}/s", "Tokens per second this rank scored in its last evaluation");
    }

    /// <summary>Records one step; labels stay low-cardinality (job, worker, layer, expert, phase — never the step).</summary>
    public void Record(string job, string worker, StepMetrics m, long tokensThisStep)
    {
        var who = new TagList { { "training_job", job }, { "worker", worker } };
        loss.Record(m.Loss, who);
        learningRate.Record(m.LearningRate, who);
        gradNorm.Record(m.GradNorm, who);
        tokensPerSecond.Record(m.TokensPerSecond, who);
        mfu.Record(m.Mfu, who);
        achievedFlops.Record(m.AchievedFlops, who);
        // Which peak the MFU is against and where it came from: in the labels, so a dashboard can show the source.
        if (m.Peak is { } peak)
            peakFlops.Record(peak.FlopsPerSecond, new TagList
            {
                { "training_job", job }, { "worker", worker }, { "precision", peak.Precision },
                { "source", peak.Source.ToString().ToLowerInvariant() }, { "hardware", peak.Hardware }, { "description", peak.Description },
            });
        globalStep.Record(m.Step, who);
        steps.Add(1, who);
        tokens.Add(tokensThisStep, who);
        foreach (var (phase, seconds) in new[]
                 {
                     ("data", m.Times.DataSeconds), ("forward", m.Times.ForwardSeconds), ("backward", m.Times.BackwardSeconds),
                     ("communication", m.Times.CommunicationSeconds), ("optimizer", m.Times.OptimizerSeconds),
                 })
            stepSeconds.Record(seconds, new TagList { { "training_job", job }, { "worker", worker }, { "phase", phase } });
        for (int layer = 0; layer < m.ExpertLoad.Count; layer++)
        {
            var load = m.ExpertLoad[layer];
            double total = load.Sum(), mean = load.Average();
            for (int e = 0; e < load.Length; e++)
                expertLoad.Record(total == 0 ? 0 : load[e] / total,
                    new TagList { { "training_job", job }, { "layer", layer.ToString() }, { "expert", e.ToString() } });
            imbalance.Record(mean == 0 ? 1 : load.Max() / mean, new TagList { { "training_job", job }, { "layer", layer.ToString() } });
        }
    }

    /// <summary>The validation cross-entropy of an evaluation (rank 0 evaluates, so only its worker has the series).</summary>
    public void ValidationLoss(string job, string worker, double nats) => validationLoss.Record(nats, Who(job, worker));

    /// <summary>Rank 0: one task's results of a checkpoint evaluation (accuracies as ratios, perplexities as values).</summary>
    public void EvaluationResult(string job, string worker, Training.Harness.TaskResult result)
    {
        foreach (var (metric, value) in result.Metrics)
        {
            var tags = new TagList { { "training_job", job }, { "worker", worker }, { "task", result.Name }, { "metric", metric } };
            if (metric.StartsWith("acc", StringComparison.Ordinal)) evalAccuracy.Record(value, tags);
            else if (metric.EndsWith("perplexity", StringComparison.Ordinal)) evalPerplexity.Record(value, tags);
        }
    }

    /// <summary>Every rank: the tokens it scored in an evaluation and how fast.</summary>
    public void EvaluationTokens(string job, string worker, long tokensScored, double seconds)
    {
        evalTokens.Add(tokensScored, Who(job, worker));
        if (seconds > 0) evalTokensPerSecond.Record(tokensScored / seconds, Who(job, worker));
    }

    /// <summary>Bytes of the tensors the training state holds on the device (see <see cref="TrainingStateBytes"/>).</summary>
    public void DeviceMemory(string job, string worker, long bytes) => deviceMemory.Record(bytes, Who(job, worker));

    /// <summary>
    /// Zero series for both directions of this run's checkpoint bytes, so a first save or load shows as an increase
    /// instead of a series that appears at its value (which rate() cannot see).
    /// </summary>
    public void CheckpointRunStarted(string job, string worker)
    {
        checkpointBytes.Add(0, Who(job, worker, "direction", "save"));
        checkpointBytes.Add(0, Who(job, worker, "direction", "load"));
    }

    /// <summary>A save began: training waited <paramref name="stall"/> for the host copy.</summary>
    public void CheckpointSnapshot(string job, string worker, TimeSpan stall) => snapshotSeconds.Record(stall.TotalSeconds, Who(job, worker));

    /// <summary>A save finished: this rank's shard of <paramref name="bytes"/> was written and uploaded.</summary>
    public void CheckpointSaved(string job, string worker, TimeSpan duration, long bytes)
    {
        saveSeconds.Record(duration.TotalSeconds, Who(job, worker));
        checkpointBytes.Add(bytes, Who(job, worker, "direction", "save"));
    }

    /// <summary>A committed checkpoint was loaded: <paramref name="bytes"/> read from the store.</summary>
    public void CheckpointLoaded(string job, string worker, TimeSpan duration, long bytes)
    {
        loadSeconds.Record(duration.TotalSeconds, Who(job, worker));
        checkpointBytes.Add(bytes, Who(job, worker, "direction", "load"));
    }

    /// <summary>
    /// Σ numel × element size over the tensors training keeps resident: the state a checkpoint holds (weights, buffers,
    /// optimizer moments and master copies) plus one gradient per trainable parameter. Activations and the allocator's
    /// cache are not included: TorchSharp 0.107 exposes no allocator statistics to measure them.
    /// </summary>
    public static long TrainingStateBytes(IEnumerable<TorchSharp.torch.Tensor> state, IEnumerable<TorchSharp.torch.Tensor> parameters) =>
        state.Sum(t => t.numel() * t.element_size()) + parameters.Where(p => p.requires_grad).Sum(p => p.numel() * p.element_size());

    static TagList Who(string job, string worker) => new() { { "training_job", job }, { "worker", worker } };

    static TagList Who(string job, string worker, string key, string value) => new() { { "training_job", job }, { "worker", worker }, { key, value } };

    public void Dispose() => meter.Dispose();
}
