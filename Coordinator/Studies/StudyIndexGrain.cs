// The ids of every study, persisted: the Coordinator wakes the running ones after a restart (StudyWakeUp).
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

[GenerateSerializer]
public sealed class StudyIndexState
{
    [Id(0)] public List<string> Ids { get; set; } = [];
}

public sealed class StudyIndexGrain([PersistentState("studies")] IPersistentState<StudyIndexState> index) : Grain, IStudyIndexGrain
{
    public async Task AddAsync(string studyId)
    {
        if (index.State.Ids.Contains(studyId)) return;
        index.State.Ids.Add(studyId);
        await index.WriteStateAsync();
    }

    public Task<string[]> ListAsync() => Task.FromResult(index.State.Ids.ToArray());
}

/// <summary>After the silo has started: every study still running gets its timer back (grain timers die with the process).</summary>
sealed class StudyWakeUp(IGrainFactory grains, ILogger<StudyWakeUp> logger) : IHostedService
{
    public async Task StartAsync(CancellationToken cancellationToken)
    {
        var ids = await grains.GetGrain<IStudyIndexGrain>(IStudyIndexGrain.Key).ListAsync();
        foreach (var id in ids) await grains.GetGrain<IStudyGrain>(id).WakeAsync();
        if (ids.Length > 0) logger.LogInformation("Woke {Count} studies", ids.Length);
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
