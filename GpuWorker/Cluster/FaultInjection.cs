// Faults a drill or a test injects into a worker's training (Worker__InjectFault): what the step guard and the live
// resumption must survive.
using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// "nan@S": step S computes with one element of a norm's weight set to NaN (restored after the step), so its loss and
/// gradients are NaN;
/// "spike@S": before step S every weight matrix gets Gaussian noise (seeded by S, the same on every rank) that stays,
/// so the loss jumps until a rollback undoes it;
/// "sigkill@S:WORKER": the worker named WORKER sends SIGKILL to its own process before step S, after step S − 1 is done
/// (its optimizer update and, under redundancy, its neighbour copy), so a test of live resumption with real processes
/// kills a rank at a known point; every other worker ignores it (all workers of a run may share the setting). WORKER may
/// also be "rank R of generation G": the worker holding rank R in generation G, so a pipeline test kills the replica of
/// the stage it chose whichever worker registered first (the next generation's rank R, which resumes at step S − 1 and
/// runs step S again, lives). It ends the process: never set it where workers run inside another process;
/// "updateloss@S:WORKER": the worker named WORKER loses its ring as step S's update begins (ITrainer.BeforeStateChange with StateChange.Update), once
/// per process (the step redone after the re-formation runs clean): under ZeRO every other rank is then caught between
/// its update and the end of its step (in the all-gather of the updated rows), where no rank holds a live state, so the
/// job resumes from the committed checkpoint. Safe in-process. Several faults: "nan@5,spike@12".
/// </summary>
public sealed partial record FaultInjection(IReadOnlyDictionary<long, string> Faults)
{
    public static readonly FaultInjection None = new(new Dictionary<long, string>());

    /// <summary>The steps before which a named worker kills its own process, and that worker.</summary>
    public IReadOnlyDictionary<long, string> Kills { get; init; } = new Dictionary<long, string>();

    /// <summary>The steps at whose update a named worker loses its ring, and that worker.</summary>
    public IReadOnlyDictionary<long, string> UpdateLosses { get; init; } = new Dictionary<long, string>();

    /// <summary>The update losses already injected by this process.</summary>
    readonly HashSet<long> lostAtUpdate = [];

    [GeneratedRegex(@"^rank (0|[1-9]\d*) of generation [1-9]\d*$")]
    private static partial Regex RankVictim();

    /// <summary>How a kill names the worker holding <paramref name="rank"/> in <paramref name="generation"/>.</summary>
    public static string RankOfGeneration(int rank, long generation) => $"rank {rank} of generation {generation}";

    public static FaultInjection Parse(string? text, string what)
    {
        if (string.IsNullOrWhiteSpace(text)) return None;
        var faults = new Dictionary<long, string>();
        var kills = new Dictionary<long, string>();
        var updateLosses = new Dictionary<long, string>();
        foreach (var part in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            var at = part.Split('@');
            bool ofWorker = at.Length == 2 && at[0] is "sigkill" or "updateloss";
            string[] stepAndWorker = ofWorker ? at[1].Split(':', 2) : at.Length == 2 ? [at[1]] : [];
            bool named = stepAndWorker.Length == 2 && stepAndWorker[1].Length > 0;
            if (at.Length != 2 || at[0] is not ("nan" or "spike" or "sigkill" or "updateloss") || ofWorker != named
                || !long.TryParse(stepAndWorker[0], NumberStyles.None, CultureInfo.InvariantCulture, out var step) || step < 1)
                throw new ArgumentException($"{what}: '{part}' is not a fault: expected nan@STEP, spike@STEP, sigkill@STEP:WORKER or updateloss@STEP:WORKER (STEP ≥ 1), comma-separated");
            // A victim named by rank that does not read as one would never match any worker: refused, not ignored.
            if (named && stepAndWorker[1].StartsWith("rank ", StringComparison.Ordinal) && (at[0] != "sigkill" || !RankVictim().IsMatch(stepAndWorker[1])))
                throw new ArgumentException($"{what}: '{part}' names no worker: expected sigkill@STEP:rank R of generation G (R ≥ 0, G ≥ 1; updateloss names a worker)");
            if (!named) faults[step] = at[0];
            else if (at[0] == "sigkill") kills[step] = stepAndWorker[1];
            else updateLosses[step] = stepAndWorker[1];
        }
        return new(faults) { Kills = kills, UpdateLosses = updateLosses };
    }

    /// <summary>
    /// As step <paramref name="step"/>'s update begins on worker <paramref name="workerId"/>: the planned ring loss, thrown
    /// as the collective failure a lost link is (the worker reports it and waits for the next generation).
    /// </summary>
    public void AtUpdate(long step, string workerId, Action<string> log)
    {
        if (!UpdateLosses.TryGetValue(step, out var victim) || victim != workerId) return;
        lock (lostAtUpdate)
            if (!lostAtUpdate.Add(step)) return;
        log($"injected fault: worker {workerId} loses its ring as step {step}'s update begins");
        throw new CollectiveException(CollectiveFailure.PeerLost, $"injected fault: worker {workerId} lost its ring as step {step}'s update began");
    }

    /// <summary>Whether worker <paramref name="workerId"/>, rank <paramref name="rank"/> of <paramref name="generation"/>, kills its process before <paramref name="step"/>.</summary>
    public bool KillsBefore(long step, string workerId, long generation, int rank) =>
        Kills.TryGetValue(step, out var victim) && (victim == workerId || victim == RankOfGeneration(rank, generation));

    /// <summary>
    /// Runs the next step of <paramref name="trainer"/> on worker <paramref name="workerId"/>, rank <paramref name="rank"/>
    /// of generation <paramref name="generation"/>, with the fault planned for it, if any.
    /// </summary>
    public StepMetrics Step(ITrainer trainer, string workerId, long generation, int rank, Action<string> log)
    {
        if (KillsBefore(trainer.Step + 1, workerId, generation, rank))
        {
            log($"injected fault: worker {workerId} sends SIGKILL to its own process (pid {Environment.ProcessId}) before step {trainer.Step + 1} " +
                $"({RankOfGeneration(rank, generation)})");
            Console.Out.Flush();
            Process.GetCurrentProcess().Kill(); // SIGKILL on Linux: no handler, no flush, no goodbye to the Coordinator
        }
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
