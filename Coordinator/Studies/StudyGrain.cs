// One study (key: study id): samples trials, runs them as ordinary jobs, follows their metric, stops the ones ASHA cuts
// at a rung, and completes when the budget is spent. Everything it knows lives in StudyGrainState.
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

public sealed class StudyGrain(
    [PersistentState("study")] IPersistentState<StudyGrainState> study,
    CoordinatorMetrics metrics,
    TimeProvider clock,
    ILogger<StudyGrain> logger) : Grain, IStudyGrain
{
    const int EventsKept = 500;
    static readonly TimeSpan Period = TimeSpan.FromSeconds(1), MaxGap = TimeSpan.FromSeconds(5);

    StudySpec? spec;
    IGrainTimer? timer;
    StudyGrainState S => study.State;
    string StudyId => this.GetPrimaryKeyString();
    StudySpec Spec => spec ??= StudyStatus.ParseStoredSpec(S.SpecJson!);
    ITrainingJobGrain Job(string id) => GrainFactory.GetGrain<ITrainingJobGrain>(id);

    public async Task<StudyStatus> CreateAsync(string specJson)
    {
        if (S.SpecJson is not null) throw new InvalidOperationException($"study '{StudyId}' already exists");
        StudySpec parsed;
        try { parsed = StudyStatus.ParseSubmittedSpec(specJson) ?? throw new JsonException("null"); }
        catch (JsonException e) { throw new JobSpecInvalidException([new SpecProblem("body", $"not a study spec JSON object: {JobSpecJson.Problem(e)}")]); }
        var problems = parsed.Validate();
        if (problems.Count > 0) throw new JobSpecInvalidException(problems);

        spec = parsed with { Name = StudyId };
        S.SpecJson = JsonSerializer.Serialize(spec, JobSpecJson.Options);
        S.State = StudyState.Running;
        S.CreatedAt = clock.GetUtcNow();
        if (spec.Scheduler.Kind == "asha") S.Rungs = AshaRungs.For(spec.Scheduler.Rungs(spec.Job!.Steps), spec.Scheduler.ReductionFactor);
        Event($"created: {spec.Budget.Trials} trials, {spec.Concurrency} at once, sampler {spec.Sampler.Kind} (seed {spec.Sampler.Seed}), scheduler {spec.Scheduler.Kind}" +
              (S.Rungs is { } r ? $" (rungs at steps {string.Join(", ", r.Steps)}, η {r.ReductionFactor})" : ""));
        await study.WriteStateAsync();
        await GrainFactory.GetGrain<IStudyIndexGrain>(IStudyIndexGrain.Key).AddAsync(StudyId);
        await TickAsync();
        StartTimer();
        return Status();
    }

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        if (S.SpecJson is not null && S.State == StudyState.Running) StartTimer();
        return Task.CompletedTask;
    }

    public Task<StudyStatus> GetStatusAsync() => Task.FromResult(Status());

    public Task WakeAsync() => S.SpecJson is null ? Task.CompletedTask : TickAsync();

    public async Task<StudyStatus> StopAsync()
    {
        if (S.SpecJson is null) throw new KeyNotFoundException($"no study '{StudyId}'");
        if (S.State != StudyState.Running) return Status();
        foreach (var t in S.Trials.Where(t => t.State == TrialState.Running))
        {
            if (t.Submitted) await Job(t.JobId).StopAsync();
            t.State = TrialState.Stopped;
        }
        S.State = StudyState.Stopped;
        Event("stopped on request");
        await study.WriteStateAsync();
        timer?.Dispose();
        return Status();
    }

    void StartTimer() => timer ??= this.RegisterGrainTimer(_ => TickAsync(), new GrainTimerCreationOptions { DueTime = Period, Period = Period, KeepAlive = true });

    /// <summary>Follows every running trial, starts new ones while the budget and concurrency allow, completes the study when done.</summary>
    async Task TickAsync()
    {
        if (S.State != StudyState.Running) return;
        bool changed = false;
        // Worker time since the last follow; at most MaxGap, so a Coordinator that was down counts no time it did not see.
        var now = clock.GetUtcNow();
        double elapsed = S.LastFollowed is { } last ? Math.Clamp((now - last).TotalSeconds, 0, MaxGap.TotalSeconds) : 0;
        S.LastFollowed = now;
        foreach (var t in S.Trials.Where(t => t.State == TrialState.Running).ToList())
            changed |= await FollowAsync(t, elapsed);
        changed |= await LaunchAsync();
        if (S.Trials.All(t => t.State != TrialState.Running) && !CanLaunch())
        {
            S.State = StudyState.Completed;
            var best = Best();
            Event($"completed: {S.Trials.Count} trials" + (best is null ? "" : $"; best {best.JobId} ({Spec.Metric} {best.Metric:G5}) with {Describe(S.Trials[best.Index])}"));
            timer?.Dispose();
            changed = true;
        }
        metrics.StudyTrials(StudyId, S.Trials.GroupBy(t => t.State).ToDictionary(g => g.Key, g => g.Count()));
        if (changed) await study.WriteStateAsync();
    }

    bool CanLaunch() => !S.SamplerExhausted && S.Trials.Count < Spec.Budget.Trials &&
                        (Spec.Budget.TotalSteps == 0 || S.Trials.Sum(t => t.Step) < Spec.Budget.TotalSteps) &&
                        (Spec.Budget.WorkerHours == 0 || S.Trials.Sum(t => t.WorkerSeconds) < Spec.Budget.WorkerHours * 3600);

    async Task<bool> LaunchAsync()
    {
        bool changed = false;
        while (S.Trials.Count(t => t.State == TrialState.Running) < Spec.Concurrency && CanLaunch())
        {
            int index = S.Trials.Count;
            var values = StudySamplers.Propose(Spec, index, StudyHistory.Observations(Spec, S.Trials));
            if (values is null) { S.SamplerExhausted = true; Event($"the {Spec.Sampler.Kind} sampler has no point left after {index} trials"); return true; }
            var t = new TrialRecord { Index = index, JobId = $"{StudyId}-t{index:D3}", Values = values, NextBoundary = Spec.Scheduler.PerturbationInterval };
            S.Trials.Add(t);
            Event($"trial {index} ({t.JobId}): {Describe(t)}");
            await study.WriteStateAsync(); // the sampler's draw is history before the job exists: a restart re-submits, never re-draws
            await SubmitAsync(t);
            changed = true;
        }
        return changed;
    }

    async Task SubmitAsync(TrialRecord t)
    {
        var spec = Spec.TrialJob(t.Values, t.JobId);
        // An exploit: the trial's previous job ends (again after a restart: stopping is idempotent) and its successor
        // starts from the donor's checkpoint.
        if (t.Exploits.LastOrDefault() is { } exploit)
        {
            await Job(exploit.OldJob).StopAsync();
            spec = spec with { StartFrom = new CheckpointRef(exploit.FromJob, exploit.Step) };
        }
        try { await Job(t.JobId).SubmitAsync(spec); }
        catch (InvalidOperationException) { } // submitted before a restart: the job exists
        catch (JobSpecInvalidException e) { t.State = TrialState.Failed; t.Error = e.Message; Event($"trial {t.Index} failed to start: {e.Message}"); }
        t.Submitted = true;
    }

    /// <summary>Reads the trial's job: new metric points (each judged at the rungs it passes), its end, its checkpoint.</summary>
    async Task<bool> FollowAsync(TrialRecord t, double elapsed)
    {
        if (!t.Submitted) { await SubmitAsync(t); return true; }
        var status = await Job(t.JobId).GetStatusAsync();
        if (status.State == JobState.Running) t.WorkerSeconds += elapsed * status.Workers.Length;
        bool changed = t.Step != status.Step;
        t.Step = status.Step;
        t.CheckpointStep = status.Committed.Where(c => c.DeletedAt is null).Select(c => (long?)c.Step).Max();
        long last = t.Curve.Count > 0 ? t.Curve[^1].Step : 0;
        var points = Spec.Metric == "loss" ? status.Loss.Select(p => new ValidationPoint(p.Step, p.Loss)) : status.ValidationLoss;
        foreach (var p in points.Where(p => p.Step > last).OrderBy(p => p.Step))
        {
            t.Curve.Add(p);
            changed = true;
            if (S.Rungs is { } rungs && !JudgeAtRungs(t, rungs, p))
            {
                await Job(t.JobId).StopAsync();
                return true;
            }
            if (Spec.Scheduler.Kind == "pbt" && p.Step >= t.NextBoundary && await PerturbAsync(t, p)) return true;
        }
        if (status.State.IsTerminal())
        {
            (t.State, t.Error) = status.State switch { JobState.Completed => (TrialState.Completed, null), JobState.Failed => (TrialState.Failed, status.Error), _ => (TrialState.Stopped, null) };
            Event($"trial {t.Index} {t.State.ToString().ToLowerInvariant()} at step {t.Step}" + (t.Curve.Count > 0 ? $" ({Spec.Metric} {t.Curve[^1].Loss:G5})" : "") + (t.Error is null ? "" : $": {t.Error}"));
            changed = true;
        }
        return changed;
    }

    /// <summary>False when the trial stops at a rung the point <paramref name="p"/> reaches.</summary>
    bool JudgeAtRungs(TrialRecord t, AshaRungs rungs, ValidationPoint p)
    {
        for (; t.NextRung < rungs.Steps.Length && p.Step >= rungs.Steps[t.NextRung]; t.NextRung++)
        {
            int k = t.NextRung;
            double? cutoff = rungs.Cutoff(k);
            if (rungs.Continues(k, t.Index, StudyHistory.Lower(Spec, p.Loss))) { metrics.StudyDecision("continued"); continue; }
            t.State = TrialState.Pruned;
            t.StoppedAtRung = k;
            Event($"trial {t.Index} stopped at rung {k} (step {rungs.Steps[k]}): {Spec.Metric} {p.Loss:G5} is not in the best 1/{rungs.ReductionFactor} " +
                  $"(cut-off {StudyHistory.Lower(Spec, cutoff!.Value):G5} over {rungs.Recorded[k].Count - 1} earlier results)");
            metrics.StudyDecision("stopped");
            return false;
        }
        return true;
    }

    /// <summary>pbt at a boundary: records the trial's result and, in the bottom quantile, moves it onto a top trial's checkpoint.</summary>
    async Task<bool> PerturbAsync(TrialRecord t, ValidationPoint p)
    {
        long interval = Spec.Scheduler.PerturbationInterval, boundary = p.Step / interval * interval;
        t.NextBoundary = boundary + interval;
        S.PbtScores[t.Index] = StudyHistory.Lower(Spec, p.Loss);
        if (p.Step >= Spec.Job!.Steps) return false; // the trial's end: nothing is left to train otherwise
        var byIndex = S.Trials.ToDictionary(x => x.Index);
        var move = Pbt.Decide(Spec, S.PbtScores, t.Index, boundary, i => byIndex[i].CheckpointStep is not null, i => byIndex[i].Values);
        if (move is null)
        {
            var (top, bottom) = Pbt.Quantiles(S.PbtScores, Spec.Scheduler.Quantile);
            if (bottom.Contains(t.Index) && !top.Contains(t.Index))
                Event($"trial {t.Index} at step {boundary} is in the bottom quantile, but no top trial ({string.Join(", ", top)}) has a committed checkpoint to copy: it trains on unchanged");
            return false;
        }
        var donor = byIndex[move.Donor];
        long step = donor.CheckpointStep!.Value;
        string before = Describe(t);
        t.Exploits.Add(new PbtExploit { Boundary = boundary, FromTrial = donor.Index, FromJob = donor.JobId, Step = step, OldJob = t.JobId, OldValues = t.Values, NewValues = move.Values });
        t.JobId = $"{StudyId}-t{t.Index:D3}-p{t.Exploits.Count}";
        t.Values = move.Values;
        t.Submitted = false;
        t.Curve.RemoveAll(x => x.Step > step);
        (t.Step, t.CheckpointStep) = (step, null); // its own checkpoints start with the new job
        t.NextBoundary = (step / interval + 1) * interval;
        Event($"trial {t.Index} at step {boundary} ({Spec.Metric} {p.Loss:G5}, bottom quantile) exploits trial {donor.Index}: job {t.JobId} starts from " +
              $"the committed checkpoint of job {donor.JobId} (trial {donor.Index}) at step {step}; explores {before} -> {Describe(t)}");
        metrics.StudyDecision("exploited");
        await study.WriteStateAsync(); // the decision is history before the job exists: a restart submits it, never decides again
        await SubmitAsync(t);
        return true;
    }

    TrialStatus? Best()
    {
        var scored = S.Trials.Where(t => t.Curve.Count > 0).ToList();
        if (scored.Count == 0) return null;
        // Completed trials trained the longest and are compared among themselves first; a study cut short falls back to all.
        var pool = scored.Any(t => t.State == TrialState.Completed) ? scored.Where(t => t.State == TrialState.Completed) : scored;
        return Trial(pool.MinBy(t => StudyHistory.Lower(Spec, t.Curve[^1].Loss))!);
    }

    string Describe(TrialRecord t) => string.Join(", ", Spec.Space.Select((d, i) => $"{d.Path} = {d.Format(t.Values[i])}"));

    TrialStatus Trial(TrialRecord t) => new()
    {
        Index = t.Index, JobId = t.JobId, State = t.State, Step = t.Step, Metric = t.Curve.Count > 0 ? t.Curve[^1].Loss : null,
        Curve = [.. t.Curve], StoppedAtRung = t.StoppedAtRung, CheckpointStep = t.CheckpointStep, Error = t.Error,
        WorkerHours = t.WorkerSeconds / 3600,
        Parameters = Spec.Space.Select((d, i) => (d.Path, d.Format(t.Values[i]))).ToDictionary(x => x.Path, x => x.Item2),
    };

    StudyStatus Status() => S.SpecJson is null ? new StudyStatus { StudyId = StudyId } : new()
    {
        StudyId = StudyId, State = S.State, SpecJson = S.SpecJson, CreatedAt = S.CreatedAt, Metric = Spec.Metric, Mode = Spec.Mode,
        Trials = [.. S.Trials.Select(Trial)], Best = Best(), Events = [.. S.Events],
        Rungs = S.Rungs is { } r
            ? [.. r.Steps.Select((step, k) => new RungStatus(k, step, r.Recorded[k].Count, r.Cutoff(k) is { } c ? StudyHistory.Lower(Spec, c) : null,
                S.Trials.Count(t => t.StoppedAtRung == k)))]
            : [],
    };

    void Event(string message)
    {
        S.Events.Add($"{clock.GetUtcNow():O} {message}");
        if (S.Events.Count > EventsKept) S.Events.RemoveRange(0, S.Events.Count - EventsKept);
        logger.LogInformation("Study {Study}: {Message}", StudyId, message);
    }
}
