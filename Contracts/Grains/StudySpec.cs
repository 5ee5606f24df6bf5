// What a user submits to search hyperparameters: a base job, a search space over its JSON fields, a metric, a budget, a
// sampler and a scheduler. Read and written as JSON only (the study grain keeps the text), validated as a whole.
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DeepSeekCluster.Contracts.Grains;

public sealed record StudySpec
{
    public static readonly string[] Metrics = ["validationLoss", "loss"], Modes = ["min", "max"];

    /// <summary>Optional study id; a fresh one is generated when absent.</summary>
    public string? Name { get; init; }
    /// <summary>The base job every trial starts from; each trial overrides the <see cref="Space"/>'s fields.</summary>
    public JobSpec? Job { get; init; }
    public List<SearchDimension> Space { get; init; } = [];
    /// <summary>validationLoss (the held-out loss at the job's eval interval) or loss (the training loss).</summary>
    public string Metric { get; init; } = "validationLoss";
    public string Mode { get; init; } = "min";
    public StudyBudget Budget { get; init; } = new();
    /// <summary>Trials running at once.</summary>
    public int Concurrency { get; init; } = 2;
    public SamplerSpec Sampler { get; init; } = new();
    public SchedulerSpec Scheduler { get; init; } = new();

    /// <summary>Every problem, each named by its JSON field path (the base job's as job.…).</summary>
    public IReadOnlyList<SpecProblem> Validate()
    {
        var problems = new List<SpecProblem>();
        void Problem(string field, string message) => problems.Add(new SpecProblem(field, message));
        if (Name is { Length: > 0 } && (!JobSpec.IsValidName(Name) || Name.Length > 48))
            Problem("name", $"'{Name}' must be 1-48 characters of a-z, A-Z, 0-9, '-', '_' or '.' (trial jobs append -tNNN)");
        if (Job is null) { Problem("job", "required: the base job spec of every trial"); return problems; }
        foreach (var p in Job.Validate()) Problem("job." + p.Field, p.Message);
        if (Space.Count == 0) Problem("space", "give at least one dimension to search");
        var fields = JsonSerializer.SerializeToNode(Job, JobSpecJson.Options)!;
        for (int i = 0; i < Space.Count; i++)
            foreach (var (field, message) in Space[i].Problems(fields)) Problem($"space[{i}].{field}", message);
        foreach (var dup in Space.GroupBy(d => d.Path).Where(g => g.Count() > 1)) Problem("space", $"the path '{dup.Key}' appears {dup.Count()} times");
        if (!Metrics.Contains(Metric)) Problem("metric", $"'{Metric}' must be one of {string.Join(", ", Metrics)}");
        if (!Modes.Contains(Mode)) Problem("mode", $"'{Mode}' must be min or max");
        if (Budget is null || Budget.Trials < 1) Problem("budget.trials", $"{Budget?.Trials} must be at least 1 trial");
        if (Budget is { TotalSteps: < 0 }) Problem("budget.totalSteps", $"{Budget.TotalSteps} must be 0 (no limit) or the steps all trials may train together");
        if (Budget is { } b && !(b.WorkerHours >= 0 && double.IsFinite(b.WorkerHours))) Problem("budget.workerHours", $"{b.WorkerHours} must be 0 (no limit) or the worker-hours all trials may use together");
        if (Concurrency < 1) Problem("concurrency", $"{Concurrency} must be at least 1 trial at once");
        if (Sampler is null || !SamplerSpec.Kinds.Contains(Sampler.Kind)) Problem("sampler.kind", $"'{Sampler?.Kind}' must be one of {string.Join(", ", SamplerSpec.Kinds)}");
        else if (Sampler.Kind == "grid" && Space.FirstOrDefault(d => d.Kind is not ("grid" or "choice")) is { } continuous)
            Problem("sampler.kind", $"grid needs every dimension to be grid or choice; '{continuous.Path}' is {continuous.Kind}");
        if (Sampler is { StartupTrials: < 1 }) Problem("sampler.startupTrials", $"{Sampler.StartupTrials} must be at least 1 (random trials before TPE models)");
        if (Scheduler is null) Problem("scheduler", "required (leave it out for fifo)");
        else foreach (var (field, message) in Scheduler.Problems(Job.Steps)) Problem("scheduler." + field, message);
        return problems;
    }

    /// <summary>The base job with <paramref name="values"/> (one per dimension, see <see cref="SearchDimension.ToJson"/>) written into it.</summary>
    public JobSpec TrialJob(IReadOnlyList<double> values, string jobName)
    {
        var node = JsonSerializer.SerializeToNode(Job, JobSpecJson.Options)!.AsObject();
        for (int i = 0; i < Space.Count; i++) SearchDimension.Set(node, Space[i].Path, Space[i].ToJson(values[i]));
        var trial = node.Deserialize<JobSpec>(JobSpecJson.Options)! with { Name = jobName };
        return Scheduler.Kind switch
        {
            "asha" => trial with { Steps = Scheduler.MaxStepsOr(Job!.Steps), EvalInterval = Scheduler.GracePeriod },
            // A result and a committed checkpoint at every perturbation boundary, none deleted: an exploit may copy any.
            "pbt" => trial with { EvalInterval = Scheduler.PerturbationInterval, CheckpointInterval = Scheduler.PerturbationInterval, KeepLast = 0 },
            _ => trial,
        };
    }
}

/// <summary>
/// One searched field. <see cref="Path"/>: the field's JSON path in the job spec (schedule.peakLr, weightDecay, guard.lrFactor).
/// Kinds: uniform and logUniform in [low, high], int (whole numbers in [low, high]), choice (one of values, unordered),
/// grid (every one of values, for the grid sampler; the others treat it as a choice). A trial's value of a choice or grid
/// dimension is the index into values.
/// </summary>
public sealed record SearchDimension
{
    public static readonly string[] Kinds = ["uniform", "logUniform", "int", "choice", "grid"];

    public string Path { get; init; } = "";
    public string Kind { get; init; } = "uniform";
    public double Low { get; init; }
    public double High { get; init; }
    public List<JsonElement> Values { get; init; } = [];

    public bool Categorical => Kind is "choice" or "grid";

    public IEnumerable<(string Field, string Message)> Problems(JsonNode job)
    {
        if (Find(job, Path) is null) yield return ("path", $"'{Path}' is not a field of the job spec (use its JSON path, such as schedule.peakLr)");
        if (!Kinds.Contains(Kind)) { yield return ("kind", $"'{Kind}' must be one of {string.Join(", ", Kinds)}"); yield break; }
        if (Categorical && Values.Count == 0) yield return ("values", $"{Kind} needs at least one value");
        if (!Categorical && !(double.IsFinite(Low) && double.IsFinite(High) && Low < High)) yield return ("high", $"need low < high, got [{Low}, {High}]");
        if (Kind == "logUniform" && !(Low > 0)) yield return ("low", $"{Low} must be positive for logUniform");
    }

    /// <summary>The JSON a trial's value stands for: a number, a whole number, or the chosen element of values.</summary>
    public JsonNode? ToJson(double value) => Kind switch
    {
        "int" => JsonValue.Create((long)Math.Round(value)),
        "choice" or "grid" => JsonNode.Parse(Values[(int)value].GetRawText()),
        _ => JsonValue.Create(value),
    };

    /// <summary>A trial's value as people read it.</summary>
    public string Format(double value) => Categorical ? Values[(int)value].GetRawText() : Kind == "int" ? $"{(long)Math.Round(value)}" : $"{value:G4}";

    static JsonNode? Find(JsonNode node, string path)
    {
        JsonNode? at = node;
        foreach (var part in path.Split('.'))
            at = at is JsonObject o ? o.FirstOrDefault(kv => kv.Key == part).Value : null; // exact: the spec's JSON names are case-sensitive elsewhere
        return at;
    }

    internal static void Set(JsonObject job, string path, JsonNode? value)
    {
        var parts = path.Split('.');
        var parent = parts.Length == 1 ? job : Find(job, string.Join('.', parts[..^1]))!.AsObject();
        parent[parts[^1]] = value;
    }
}

public sealed record StudyBudget
{
    public int Trials { get; init; } = 8;
    /// <summary>Steps all trials may train together (0: no limit): a worker-time budget at a fixed step cost.</summary>
    public long TotalSteps { get; init; }
    /// <summary>Worker-hours all trials may hold workers together (0: no limit): no trial starts once they are spent.</summary>
    public double WorkerHours { get; init; }
}

public sealed record SamplerSpec
{
    public static readonly string[] Kinds = ["random", "grid", "tpe"];
    public string Kind { get; init; } = "random";
    public int Seed { get; init; } = 1;
    /// <summary>TPE: trials drawn at random before the model takes over.</summary>
    public int StartupTrials { get; init; } = 5;
}

/// <summary>
/// fifo: every trial trains to the end. asha: rungs at gracePeriod·η^k steps below maxSteps; a trial reaching a rung
/// stops unless its metric is within the best 1/η of the results recorded there before it. pbt: at every
/// perturbationInterval steps a trial in the bottom quantile copies a top-quantile trial's committed checkpoint and
/// perturbs its values (docs/studies.md).
/// </summary>
public sealed record SchedulerSpec
{
    public static readonly string[] Kinds = ["fifo", "asha", "pbt"];
    public string Kind { get; init; } = "fifo";
    public int GracePeriod { get; init; } = 10;
    public int ReductionFactor { get; init; } = 3;
    /// <summary>Steps of a trial that is never stopped; 0: the base job's steps.</summary>
    public int MaxSteps { get; init; }

    public int MaxStepsOr(int jobSteps) => MaxSteps > 0 ? MaxSteps : jobSteps;

    // ---- pbt ----
    /// <summary>Steps between a trial's perturbation boundaries (its results and checkpoints come at these steps).</summary>
    public int PerturbationInterval { get; init; } = 10;
    /// <summary>The fraction of scored trials in the top and in the bottom (at least one each).</summary>
    public double Quantile { get; init; } = 0.25;
    /// <summary>Explore: a numeric value is the donor's times one of these, drawn uniformly, clamped to the dimension's range.</summary>
    public double[] PerturbFactors { get; init; } = [0.8, 1.2];
    /// <summary>Explore: the chance that a value is drawn afresh from its dimension instead.</summary>
    public double ResampleProbability { get; init; } = 0.25;

    /// <summary>The rungs' steps: gracePeriod·η^k below the maximum.</summary>
    public long[] Rungs(int jobSteps)
    {
        var rungs = new List<long>();
        for (long r = GracePeriod; r < MaxStepsOr(jobSteps); r *= ReductionFactor) rungs.Add(r);
        return [.. rungs];
    }

    public IEnumerable<(string Field, string Message)> Problems(int jobSteps)
    {
        if (!Kinds.Contains(Kind)) { yield return ("kind", $"'{Kind}' must be one of {string.Join(", ", Kinds)}"); yield break; }
        if (Kind == "pbt")
        {
            if (PerturbationInterval < 1 || PerturbationInterval >= jobSteps)
                yield return ("perturbationInterval", $"{PerturbationInterval} must be between 1 and the job's steps - 1 ({jobSteps - 1})");
            if (!(Quantile > 0 && Quantile <= 0.5)) yield return ("quantile", $"{Quantile} must be in (0, 0.5]");
            if (PerturbFactors is not { Length: > 0 } || PerturbFactors.Any(f => !(f > 0 && double.IsFinite(f))))
                yield return ("perturbFactors", "must be one or more positive numbers (such as [0.8, 1.2])");
            if (!(ResampleProbability >= 0 && ResampleProbability <= 1)) yield return ("resampleProbability", $"{ResampleProbability} must be between 0 and 1");
            yield break;
        }
        if (Kind != "asha") yield break;
        if (GracePeriod < 1) yield return ("gracePeriod", $"{GracePeriod} must be at least 1 step");
        if (ReductionFactor < 2) yield return ("reductionFactor", $"{ReductionFactor} must be at least 2");
        if (MaxSteps < 0) yield return ("maxSteps", $"{MaxSteps} must be 0 (the job's steps) or positive");
        else if (GracePeriod >= 1 && MaxStepsOr(jobSteps) <= GracePeriod)
            yield return ("gracePeriod", $"{GracePeriod} must be below maxSteps ({MaxStepsOr(jobSteps)}): no rung would exist");
    }
}
