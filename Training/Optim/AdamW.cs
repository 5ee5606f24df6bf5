// AdamW with decoupled weight decay, fp32 master weights for low-precision parameters, and a named, saveable state.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Optim;

/// <summary>
/// PyTorch's AdamW update (Loshchilov and Hutter), written out so that its state has names: checkpoints store
/// <c>optimizer.{param}.exp_avg</c>, <c>.exp_avg_sq</c> (and <c>.master</c> for bf16 parameters) beside the weights,
/// and any layout can load them. Parameters of rank &lt; 2 (norms, biases) get no weight decay.
/// </summary>
public sealed class AdamW : IDisposable
{
    public sealed class Slot
    {
        public required string Name { get; init; }
        public required Tensor Param { get; init; }
        public required Tensor ExpAvg { get; init; }       // float32
        public required Tensor ExpAvgSq { get; init; }     // float32
        public Tensor? Master { get; init; }               // float32 copy when Param is bf16/fp16
        public required bool Decay { get; init; }
    }

    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.95;
    public double Eps { get; init; } = 1e-8;
    public double WeightDecay { get; init; } = 0.1;
    /// <summary>Optimizer steps taken (the t of bias correction).</summary>
    public long StepCount { get; set; }
    public IReadOnlyList<Slot> Slots => slots;
    readonly List<Slot> slots = new();

    public AdamW(IEnumerable<(string name, Tensor param)> parameters)
    {
        var seen = new HashSet<IntPtr>();
        foreach (var (name, p) in parameters)
        {
            if (!seen.Add(p.Handle)) continue; // tied weights are one parameter
            bool lowPrecision = p.dtype is ScalarType.BFloat16 or ScalarType.Float16;
            var master = lowPrecision ? p.detach().to_type(ScalarType.Float32) : null;
            var stateType = p.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            slots.Add(new Slot
            {
                Name = name, Param = p, Master = master, Decay = p.dim() >= 2,
                ExpAvg = zeros_like(p, dtype: stateType), ExpAvgSq = zeros_like(p, dtype: stateType),
            });
        }
    }

    /// <summary>Applies one update with learning rate <paramref name="lr"/> from the current gradients (missing ones count as zero).</summary>
    public void Step(double lr)
    {
        StepCount++;
        double c1 = 1 - Math.Pow(Beta1, StepCount), c2 = 1 - Math.Pow(Beta2, StepCount);
        using var noGrad = no_grad();
        foreach (var s in slots)
        {
            using var scope = NewDisposeScope();
            var target = s.Master ?? s.Param;
            var g = s.Param.grad is { } grad ? grad.to_type(s.ExpAvg.dtype) : zeros_like(s.ExpAvg);
            if (s.Decay && WeightDecay != 0) target.mul_(1 - lr * WeightDecay);
            s.ExpAvg.mul_(Beta1).add_(g, alpha: 1 - Beta1);
            s.ExpAvgSq.mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
            var denom = (s.ExpAvgSq / c2).sqrt_().add_(Eps);
            target.addcdiv_(s.ExpAvg, denom, value: -lr / c1);
            if (s.Master is not null) s.Param.copy_(s.Master);
        }
    }

    /// <summary>Global L2 norm of all gradients; scales them down to <paramref name="maxNorm"/> when above it (maxNorm &lt;= 0: no clipping).</summary>
    public double ClipGradNorm(double maxNorm)
    {
        using var noGrad = no_grad();
        double sumSq = 0;
        foreach (var s in slots)
            if (s.Param.grad is { } g)
            {
                using var n = g.to_type(ScalarType.Float64).square().sum();
                sumSq += n.item<double>();
            }
        double norm = Math.Sqrt(sumSq);
        if (maxNorm > 0 && norm > maxNorm)
        {
            double scale = maxNorm / (norm + 1e-6);
            foreach (var s in slots) s.Param.grad?.mul_(scale);
        }
        return norm;
    }

    /// <summary>Named optimizer tensors for a checkpoint (aliases, not copies).</summary>
    public IEnumerable<KeyValuePair<string, Tensor>> StateTensors(Func<string, string>? rename = null)
    {
        foreach (var s in slots)
        {
            var name = rename?.Invoke(s.Name) ?? s.Name;
            yield return new($"optimizer.{name}.exp_avg", s.ExpAvg);
            yield return new($"optimizer.{name}.exp_avg_sq", s.ExpAvgSq);
            if (s.Master is not null) yield return new($"optimizer.{name}.master", s.Master);
        }
    }

    /// <summary>Restores moments (and master weights) from checkpoint tensors; every slot must be present.</summary>
    public void LoadStateTensors(IReadOnlyDictionary<string, Tensor> tensors, string source, Func<string, string>? rename = null)
    {
        using var noGrad = no_grad();
        foreach (var s in slots)
        {
            var name = rename?.Invoke(s.Name) ?? s.Name;
            Copy(tensors, $"optimizer.{name}.exp_avg", s.ExpAvg, source);
            Copy(tensors, $"optimizer.{name}.exp_avg_sq", s.ExpAvgSq, source);
            if (s.Master is not null)
            {
                if (tensors.ContainsKey($"optimizer.{name}.master")) Copy(tensors, $"optimizer.{name}.master", s.Master, source);
                else s.Master.copy_(s.Param.to_type(ScalarType.Float32));
            }
        }
    }

    static void Copy(IReadOnlyDictionary<string, Tensor> tensors, string key, Tensor target, string source)
    {
        if (!tensors.TryGetValue(key, out var value))
            throw new InvalidDataException($"{source}: optimizer state '{key}' is missing");
        if (!value.shape.SequenceEqual(target.shape))
            throw new InvalidDataException($"{source}: optimizer state '{key}' has shape [{string.Join(", ", value.shape)}], expected [{string.Join(", ", target.shape)}]");
        target.copy_(value);
    }

    public void Dispose()
    {
        foreach (var s in slots) { s.ExpAvg.Dispose(); s.ExpAvgSq.Dispose(); s.Master?.Dispose(); }
        slots.Clear();
    }
}
