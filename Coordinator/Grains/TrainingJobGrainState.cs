// What a training job persists: spec, state, generation, ranks, progress, and the plain classes that keep its ledger,
// checkpoints and recovery clock. Written after every change by TrainingJobGrain.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class TrainingJobGrainState
{
    [Id(0)] public JobSpec? Spec { get; set; }
    [Id(1)] public JobState State { get; set; }
    [Id(2)] public long Generation { get; set; }
    [Id(3)] public long Step { get; set; }
    [Id(4)] public List<LossPoint> Loss { get; set; } = [];
    /// <summary>The current generation's ranks, in rank order.</summary>
    [Id(5)] public List<JobWorker> Workers { get; set; } = [];
    /// <summary>Every worker the registry handed to this job (members and, while forming, those waiting for more).</summary>
    [Id(6)] public List<WorkerCapabilities> Pool { get; set; } = [];
    [Id(8)] public List<JobEvent> Events { get; set; } = [];
    [Id(9)] public string? Error { get; set; }
    [Id(10)] public DateTimeOffset? SubmittedAt { get; set; }
    /// <summary>The exactly-once ledger of the current state's lineage (see <see cref="SampleLedger"/>).</summary>
    [Id(12)] public SampleLedger Ledger { get; set; } = new();
    [Id(13)] public ExpertLoad? ExpertLoad { get; set; }
    /// <summary>The step the current generation resumed from; null until its rank 0 reports Resumed.</summary>
    [Id(15)] public long? GenerationResumedAt { get; set; }
    [Id(16)] public CheckpointBook CheckpointBook { get; set; } = new();
    [Id(17)] public RecoveryClock Recovery { get; set; } = new();
    /// <summary>The step the current generation was told to resume from (its Assignment's ResumeStep).</summary>
    [Id(18)] public long GenerationResumeStep { get; set; }
    /// <summary>The current generation's data-parallel width (0: formed by a Coordinator that did not record it); the
    /// members' ranks index its layout when a re-formation picks the survivors to keep (TrainingJobGrain.Members.cs).</summary>
    [Id(62)] public int GenerationDp { get; set; }
    [Id(19)] public List<ValidationPoint> Validation { get; set; } = [];
    /// <summary>The evaluation tasks' scores by checkpoint step (JobSpec.evalTasks), oldest first.</summary>
    [Id(60)] public List<EvaluationScore> Evaluations { get; set; } = [];
    /// <summary>Rank 0's results JSON by step until the step's checkpoint is handed to the committer, which keeps it with the checkpoint in the store.</summary>
    [Id(61)] public Dictionary<long, string> EvaluationDocuments { get; set; } = [];
    /// <summary>Each member's latest achieved FLOP/s and device peak: the status's MFU (see <see cref="UtilizationBoard"/>).</summary>
    [Id(40)] public UtilizationBoard Utilization { get; set; } = new();
    /// <summary>While a preempted job's members save its checkpoint before they are released; null otherwise.</summary>
    [Id(69)] public PreemptionCheckpoint? Preemption { get; set; }
    /// <summary>
    /// Step reports of the current generation that arrived before its rank 0's Resumed (each rank reports on its own
    /// stream), held until that report says which steps the generation redoes (TrainingJobGrain.Resume.cs).
    /// </summary>
    [Id(74)] public List<StepReport> StepsBeforeResume { get; set; } = [];
    /// <summary>Rank 0 reported a step of the current generation before its Resumed: that report was lost, none is awaited.</summary>
    [Id(75)] public bool ResumeReportMissing { get; set; }

    // State written before CheckpointBook and RecoveryClock existed; moved into them on activation (MoveLegacyState).
    [Id(7)] public List<CheckpointRecord> Checkpoints { get; set; } = [];
    [Id(11)] public List<CommittedCheckpoint> Committed { get; set; } = [];
    [Id(14)] public Reformation? Reforming { get; set; }

    /// <summary>
    /// A new generation is formed: its Resumed is awaited again, and the steps the previous one reported before a Resumed
    /// that never came are late reports of that generation (kept unless beyond where the new one resumes, as any other).
    /// </summary>
    public void NextGeneration()
    {
        Generation++;
        GenerationResumedAt = null;
        ResumeReportMissing = false;
        foreach (var r in StepsBeforeResume) Ledger.AddLate(r.Step, r.SampleStart, r.SampleCount, Spec!.GlobalBatch);
        StepsBeforeResume.Clear();
    }

    /// <summary>Moves what an older Coordinator persisted into the classes that hold it now; true when anything moved.</summary>
    public bool MoveLegacyState()
    {
        if (Checkpoints.Count == 0 && Committed.Count == 0 && Reforming is null) return false;
        CheckpointBook.Reported.AddRange(Checkpoints);
        foreach (var c in Committed) CheckpointBook.Commit(c);
        Recovery.Current ??= Reforming;
        if (GenerationResumedAt is null) GenerationResumeStep = CheckpointBook.NewestCommitted; // what its formation told it
        (Checkpoints, Committed, Reforming) = ([], [], null);
        return true;
    }

    // ---- Curves: loss, tokens per second, validation, expert load ----

    /// <summary>A step's loss point (once per step; the oldest go beyond <paramref name="lossHistory"/>) and rank 0's expert load.</summary>
    public void RecordCurves(StepReport report, int lossHistory)
    {
        if (report.ExpertLoad.Length > 0 && report.Experts > 0 && report.ExpertLoad.Length == report.ExpertLayers.Length * report.Experts
            && (ExpertLoad is null || report.Step >= ExpertLoad.Step))
            ExpertLoad = new ExpertLoad
            {
                Step = report.Step, Layers = report.ExpertLayers,
                Fractions = [.. Enumerable.Range(0, report.ExpertLayers.Length).Select(i => report.ExpertLoad[(i * report.Experts)..((i + 1) * report.Experts)])],
            };
        if (Loss.Any(p => p.Step == report.Step)) return;
        Loss.Add(new LossPoint(report.Step, report.Loss, report.TokensPerSecond));
        if (Loss.Count > lossHistory) Loss.RemoveRange(0, Loss.Count - lossHistory);
    }

    /// <summary>A validation pass's loss, once per step (every rank of a replica group may report the same pass).</summary>
    public void RecordValidation(StepReport report)
    {
        if (!report.HasValidation || !double.IsFinite(report.ValidationLoss) || Validation.Any(p => p.Step == report.Step)) return;
        Validation.Add(new ValidationPoint(report.Step, report.ValidationLoss));
        Validation.Sort((a, b) => a.Step.CompareTo(b.Step));
    }

    /// <summary>A checkpoint evaluation's scores, once per step (rank 0 reports them); why not, for a report that does not parse.</summary>
    public string? RecordEvaluation(StepReport report)
    {
        if (report.EvalResultsJson.Length == 0 || Evaluations.Any(e => e.Step == report.Step)) return null;
        try { Evaluations.AddRange(EvaluationResults.Parse(report.Step, report.EvalResultsJson)); }
        catch (InvalidDataException e) { return e.Message; }
        EvaluationDocuments[report.Step] = report.EvalResultsJson;
        Evaluations.Sort((a, b) => a.Step.CompareTo(b.Step));
        return null;
    }

    /// <summary>
    /// The results JSON of <paramref name="step"/>, removed: it goes with the step's checkpoint to the committer once. Rank 0
    /// reports a step's scores before its checkpoint file, so they are here by the time every rank's file is.
    /// </summary>
    public string? TakeEvaluationDocument(long step) => EvaluationDocuments.Remove(step, out var json) ? json : null;

    /// <summary>The state now descends from <paramref name="step"/>: the points of later steps are redone.</summary>
    public void DropCurvesAfter(long step)
    {
        foreach (long later in EvaluationDocuments.Keys.Where(s => s > step).ToList()) EvaluationDocuments.Remove(later);
        Loss.RemoveAll(p => p.Step > step);
        Validation.RemoveAll(p => p.Step > step);
        Evaluations.RemoveAll(p => p.Step > step);
    }

    public JobStatus ToStatus(string jobId) => new()
    {
        JobId = jobId,
        State = State,
        Generation = Generation,
        Step = Step,
        Spec = Spec,
        Loss = [.. Loss],
        Workers = [.. Workers],
        Checkpoints = CheckpointBook.Shown(),
        Committed = [.. CheckpointBook.Committed],
        ValidationLoss = [.. Validation],
        Evaluations = [.. Evaluations],
        Consumption = Ledger.Summary(Spec?.GlobalBatch ?? 0),
        ExpertLoad = ExpertLoad,
        Utilization = Utilization.Of(Generation),
        Events = [.. Events],
        Error = Error,
        SubmittedAt = SubmittedAt,
    };
}
