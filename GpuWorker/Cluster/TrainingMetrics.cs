// The worker's deepseek_train_* and deepseek_moe_* instruments (docs/metrics.md): recorded after every step.
using System.Diagnostics;
using System.Diagnostics.Metrics;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class TrainingMetrics : IDisposable
{
    public const string MeterName = "DeepSeekCluster.Training";

    readonly Meter meter = new(MeterName);
    readonly Gauge<double> loss, learningRate, gradNorm, tokensPerSecond, mfu, expertLoad, imbalance;
    readonly Gauge<long> globalStep;
    readonly Histogram<double> stepSeconds;
    readonly Counter<long> steps, tokens;

    public TrainingMetrics()
    {
        loss = meter.CreateGauge<double>("deepseek.train.loss", "{nat}");
        learningRate = meter.CreateGauge<double>("deepseek.train.learning_rate");
        gradNorm = meter.CreateGauge<double>("deepseek.train.grad_norm");
        tokensPerSecond = meter.CreateGauge<double>("deepseek.train.tokens_per_second", "{token}/s");
        mfu = meter.CreateGauge<double>("deepseek.train.mfu_ratio", "1");
        globalStep = meter.CreateGauge<long>("deepseek.train.global_step", "{step}");
        stepSeconds = meter.CreateHistogram<double>("deepseek.train.step", "s", "time of one step in each phase", tags: null,
            advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60] });
        steps = meter.CreateCounter<long>("deepseek.train.steps", "{step}");
        tokens = meter.CreateCounter<long>("deepseek.train.tokens", "{token}");
        expertLoad = meter.CreateGauge<double>("deepseek.moe.expert_load_ratio", "1");
        imbalance = meter.CreateGauge<double>("deepseek.moe.load_imbalance_ratio", "1");
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

    public void Dispose() => meter.Dispose();
}
