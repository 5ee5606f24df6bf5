// Faults a drill or a test injects into a worker's training (Worker__InjectFault): what the step guard must survive.
using System.Globalization;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// "nan@S": step S computes with one element of a norm's weight set to NaN (restored after the step), so its loss and
/// gradients are NaN;
/// "spike@S": before step S every weight matrix gets Gaussian noise (seeded by S, the same on every rank) that stays,
/// so the loss jumps until a rollback undoes it. Several faults: "nan@5,spike@12".
/// </summary>
public sealed record FaultInjection(IReadOnlyDictionary<long, string> Faults)
{
    public static readonly FaultInjection None = new(new Dictionary<long, string>());

    public static FaultInjection Parse(string? text, string what)
    {
        if (string.IsNullOrWhiteSpace(text)) return None;
        var faults = new Dictionary<long, string>();
        foreach (var part in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            var at = part.Split('@');
            if (at.Length != 2 || at[0] is not ("nan" or "spike") || !long.TryParse(at[1], NumberStyles.None, CultureInfo.InvariantCulture, out var step) || step < 1)
                throw new ArgumentException($"{what}: '{part}' is not a fault: expected nan@STEP or spike@STEP (STEP ≥ 1), comma-separated");
            faults[step] = at[0];
        }
        return new(faults);
    }

    /// <summary>Runs the next step of <paramref name="trainer"/> with the fault planned for it, if any.</summary>
    public StepMetrics Step(ITrainer trainer)
    {
        if (!Faults.TryGetValue(trainer.Step + 1, out var fault)) return trainer.TrainStep();
        var weights = trainer.CheckpointTensors().Where(kv => !kv.Key.StartsWith("optimizer.", StringComparison.Ordinal) && kv.Value.is_floating_point())
            .Select(kv => kv.Value).ToList();
        if (fault == "spike")
        {
            using (no_grad())
            using (NewDisposeScope())
            {
                var generator = new Generator((ulong)trainer.Step + 1);
                foreach (var w in weights.Where(w => w.dim() >= 2)) w.add_(randn(w.shape, dtype: w.dtype, generator: generator).to(w.device));
            }
            return trainer.TrainStep();
        }
        // A norm's weight multiplies every position, so one NaN there reaches the loss whatever tokens the batch holds.
        var norm = trainer.CheckpointTensors().Where(kv => kv.Key.EndsWith("norm.weight", StringComparison.Ordinal)).Select(kv => kv.Value).FirstOrDefault() ?? weights[0];
        var first = norm.view(-1).narrow(0, 0, 1);
        using var saved = first.clone();
        using (no_grad()) first.fill_(double.NaN);
        try { return trainer.TrainStep(); }
        finally { using (no_grad()) first.copy_(saved); }
    }
}
