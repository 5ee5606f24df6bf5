// Step reports that overtake their generation's Resumed report. Rank 0 reports where the generation resumed before its
// first step, but every rank reports on its own stream: another rank's steps (after a Coordinator restart, a whole
// queue of them flushed on reconnect) can reach the grain first. Handled before the Resumed, they raised the job's
// step, so the Resumed counted this generation's own steps as redone ("8 steps redone" for none) and its ResumedAt
// dropped them from the ledger and the curves. They are held until the Resumed, then handled in order.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    /// <summary>
    /// Holds a step report of the current generation whose Resumed has not been handled; true when held. Rank 0's own step
    /// follows its Resumed on one stream, so rank 0's step without one means that Resumed was lost (written to a
    /// Coordinator that died before handling it): nothing is awaited any more, and what was held is handled now.
    /// </summary>
    async Task<bool> HoldUntilResumedAsync(long generation, StepReport report)
    {
        if (generation != S.Generation || S.GenerationResumedAt is not null || S.ResumeReportMissing || S.State.IsTerminal()) return false;
        if (report.Rank != 0)
        {
            S.StepsBeforeResume.Add(report);
            await job.WriteStateAsync();
            return true;
        }
        logger.LogWarning("Job {Job}: rank 0 reported step {Step} of generation {Generation} without its Resumed report; the steps held for it are handled now",
            JobId, report.Step, generation);
        S.ResumeReportMissing = true;
        await ReplayStepsBeforeResumeAsync(generation);
        return false;
    }

    /// <summary>The held reports of <paramref name="generation"/>, handled in step order as if they had come after its Resumed.</summary>
    async Task ReplayStepsBeforeResumeAsync(long generation)
    {
        if (S.StepsBeforeResume.Count == 0 || generation != S.Generation) return;
        var held = S.StepsBeforeResume.OrderBy(r => r.Step).ThenBy(r => r.Rank).ToList();
        S.StepsBeforeResume.Clear();
        foreach (var r in held) await ReportStepAsync(generation, r);
    }
}
