// The one validation measure of every run (standalone, a data-parallel replica, a pipeline): the mean LM cross-entropy
// of the first micro-batches of a validation source, read from global index 0.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public static class Evaluation
{
    /// <summary>Micro-batches a cluster job evaluates over (its spec has no field for it; the standalone run's EvalBatches default).</summary>
    public const int ClusterBatches = 4;

    /// <summary>
    /// The micro-batches an evaluation reads: up to <paramref name="batches"/> of <paramref name="microBatch"/> samples
    /// from global index 0, the last one shorter when the source ends inside it (a small validation split still counts).
    /// </summary>
    public static IEnumerable<SampleRange> Batches(long sampleCount, int microBatch, int batches)
    {
        for (int b = 0; b < batches && (long)b * microBatch < sampleCount; b++)
        {
            long start = (long)b * microBatch;
            yield return new SampleRange(start, (int)Math.Min(microBatch, sampleCount - start));
        }
    }

    /// <summary>
    /// Mean LM cross-entropy of a whole <paramref name="model"/> over <see cref="Batches"/> of <paramref name="source"/>;
    /// NaN when it holds none. Leaves the model in training mode.
    /// </summary>
    public static double LmLoss(DeepSeekForCausalLM model, ISampleSource source, int microBatch, Device device, int batches)
    {
        using var hold = FinalizerHold.Enter();
        model.eval();
        try
        {
            using var noGrad = no_grad();
            double sum = 0;
            int done = 0;
            foreach (var range in Batches(source.SampleCount, microBatch, batches))
            {
                using var scope = NewDisposeScope();
                var batch = source.Fetch(range.Start, range.Count).to(device);
                sum += Trainer.ValueOf(CrossEntropy(model.Forward(batch.narrow(1, 0, source.SeqLen)).Logits_BTV, batch.narrow(1, 1, source.SeqLen)));
                done++;
            }
            return done == 0 ? double.NaN : sum / done;
        }
        finally { model.train(); }
    }

    /// <summary>Cross-entropy of (B, T, V) logits against (B, T) targets, in float32 at least (bf16 logits lose the loss's digits).</summary>
    public static Tensor CrossEntropy(Tensor logits_BTV, Tensor target_BT)
    {
        long v = logits_BTV.shape[^1];
        var logits = logits_BTV.dtype == ScalarType.Float64 ? logits_BTV : logits_BTV.to_type(ScalarType.Float32);
        return nn.functional.cross_entropy(logits.reshape(-1, v), target_BT.reshape(-1));
    }
}
