// A step whose only micro-batch is this rank's and no other rank adds to it: its mean, with no words at all.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public sealed partial class ExactGradientSum
{
    bool lone; // the step's only term was left in the gradients (AddOnlyTerm)

    /// <summary>
    /// Whether CPU tensors of float32, bfloat16 or float64 go through the one-pass kernels (ExactWordKernels) rather
    /// than torch's chain of float64 and int64 ops (the reference, and what every other device runs): the same words
    /// and the same mean bits, in one read of each gradient and word. On by default.
    /// </summary>
    public bool NativeCpu { get; set; } = true;

    /// <summary>
    /// Counts the current gradients as the step's only term, over every rank (a standalone trainer with one micro-batch
    /// per step): they stay where they are, and <see cref="WriteMean"/> turns them into exactly what adding them and
    /// writing the mean would, round(x·2^64)/2^64/count in the gradient's dtype, poisoned as the words would be. No
    /// words are converted or summed, which is the point: a sum of one term has no order to make independent of.
    /// A reducer must not sum <see cref="High"/> and <see cref="Low"/> after this: they hold nothing.
    /// </summary>
    public void AddOnlyTerm()
    {
        if (Terms > 0) throw new InvalidOperationException($"the only term of a step cannot follow {Terms} other terms");
        if (ShardOnly || Shards is not null) throw new InvalidOperationException("a ZeRO-sharded sum always has the terms of other ranks: add them with AddAndClearGradients");
        lone = true;
        Terms = 1;
    }

    /// <summary><see cref="WriteMean"/> of the lone term, in place: flat buffer by flat buffer, or parameter by parameter.</summary>
    void WriteLoneMean(long count)
    {
        var targets = flat is not null
            ? FlatBuffers()
            : parameters.Select(p => p.grad ??= zeros_like(p).DetachFromDisposeScope()).ToList(); // no gradient: a zero term
        double seen = 0;
        foreach (var target in targets)
        {
            using var scope = NewDisposeScope();
            bool inPlace = target.is_contiguous();
            var all = inPlace ? target.view(-1) : target.contiguous().view(-1);
            long n = all.numel();
            for (long c = 0; c < n; c += NativeChunk)
            {
                var x = all.narrow(0, c, Math.Min(NativeChunk, n - c));
                if (NativeCpu && ExactWordKernels.Supports(x)) seen = Math.Max(seen, ExactWordKernels.LoneMean(x, count));
                else
                {
                    var q = x.to_type(ScalarType.Float64, copy: true);
                    worst.copy_(maximum(worst, maximum(q.max(), q.min().neg()).unsqueeze(0)));
                    // +0: the words of a −0 (or of a small negative that rounds to 0) are 0, whose mean is +0.
                    x.copy_(q.mul_(Scale).round_().add_(0.0).div_(Scale).div_(count));
                }
            }
            if (!inPlace) target.copy_(all.view(target.shape));
        }
        worst.fill_(Math.Max(worst.item<double>(), seen));
        if (!(worst.item<double>() < Bound))
            foreach (var target in targets) target.fill_(double.NaN);
    }
}
