// A job claims free workers, then says it waits, in two calls; a worker that becomes free between them must still reach it.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class RegistryRaceTests
{
    [Fact]
    public async Task AWorkerOnlineBetweenAJobsClaimAndItsWaitIsOfferedToTheJob()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var registry = c.Grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);
        var job = c.Job("race-online");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1));
        Assert.Equal(JobState.Forming, (await job.GetStatusAsync()).State); // no worker yet: it waits to form

        // The job's next TryForm, cut where the race falls: its claim finds no free worker and it is not waiting yet...
        await registry.SetWaitingAsync("race-online", JobWait.None);
        Assert.Empty(await registry.ClaimWorkersAsync("race-online", 1));
        // ...a worker comes online, and no waiting job hears of it...
        await c.Worker("late").RegisterAsync(TestSpecs.Worker("late"), null);
        // ...then the job says it waits: the registry must offer it the worker it missed.
        await registry.SetWaitingAsync("race-online", JobWait.ToForm);

        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running,
            "the job forming with the worker that came online between its claim and its wait");
        Assert.Equal("late", Assert.Single(status.Workers).WorkerId);
    }
}
