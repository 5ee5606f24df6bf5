// --study FILE: the AppHost runs one study on its cluster and prints the trials' table as they change, then at the end.
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.AppHost;

public static class StudyRun
{
    /// <summary>
    /// Creates the study of <paramref name="file"/> (its base job's dataset defaults to the prepared corpus), or follows it
    /// when an earlier run already created it, until it ends; the final status.
    /// </summary>
    public static async Task<StudyStatus> RunAsync(CoordinatorClient coordinator, string file, string datasetId, CancellationToken ct)
    {
        var spec = ReadSpec(file, datasetId);
        string studyId = spec["name"]?.GetValue<string>() ?? throw new InvalidOperationException("unreachable: ReadSpec names the study");
        var created = await coordinator.CreateStudyAsync(spec.ToJsonString(), ct);
        Log.AppHost(created ? $"created study {studyId} from {file}" : $"study {studyId} exists in this run folder: following it");
        string last = "";
        while (true)
        {
            var status = await coordinator.StudyAsync(studyId, ct);
            // Printed when a trial starts, ends or reports its metric (not at every step).
            string key = string.Join(";", status.Trials.Select(t => $"{t.State}:{t.Metric}")) + string.Join(";", status.Rungs.Select(r => r.Results));
            if (key != last) { Log.AppHost(Table(status)); last = key; }
            if (status.State != StudyState.Running)
            {
                Log.AppHost($"study {studyId} ended: {status.State}" + (status.Best is { } b
                    ? $"; best trial {b.JobId} ({status.Metric} {b.Metric:G5}) with {Parameters(b)}, checkpoint {(b.CheckpointStep is { } s ? $"checkpoints/{b.JobId}/{s:D8}" : "none committed")}"
                    : ""));
                return status;
            }
            await Task.Delay(TimeSpan.FromSeconds(2), ct);
        }
    }

    /// <summary>The spec as JSON, with a name (the file's) and the prepared dataset where the base job names none.</summary>
    public static JsonObject ReadSpec(string file, string datasetId)
    {
        if (!File.Exists(file)) throw new InvalidOperationException($"--study {file}: no such file");
        JsonObject spec;
        try { spec = JsonNode.Parse(File.ReadAllText(file))?.AsObject() ?? throw new JsonException("null"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { throw new InvalidOperationException($"--study {file}: not a JSON object ({e.Message})"); }
        spec["name"] ??= new string([.. Path.GetFileNameWithoutExtension(file).Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.' ? c : '-')]);
        if (spec["job"] is JsonObject job && string.IsNullOrWhiteSpace(job["dataset"]?.GetValue<string>())) job["dataset"] = datasetId;
        return spec;
    }

    /// <summary>The base job's seqLen in the study file, if it gives one.</summary>
    public static int? SeqLenOf(string file) => ReadSpec(file, "")["job"]?["seqLen"]?.GetValue<int>();

    /// <summary>One line per trial: its values, state, step, metric, and where ASHA stopped it; then the rungs.</summary>
    public static string Table(StudyStatus s)
    {
        var lines = new List<string> { $"study {s.StudyId} ({s.State.ToString().ToLowerInvariant()}), {s.Metric} ({s.Mode}):" };
        foreach (var t in s.Trials)
            lines.Add($"  {t.JobId,-24} {t.State.ToString().ToLowerInvariant(),-9} step {t.Step,6}  {s.Metric} {(t.Metric is { } m ? m.ToString("F4", CultureInfo.InvariantCulture) : "-"),8}" +
                      $"  {Parameters(t)}{(t.StoppedAtRung is { } r ? $"  (stopped at rung {r})" : "")}");
        foreach (var r in s.Rungs)
            lines.Add($"  rung {r.Rung} at step {r.Step}: {r.Results} results, {r.Stopped} stopped, cut-off {(r.Cutoff is { } c ? c.ToString("F4", CultureInfo.InvariantCulture) : "-")}");
        return string.Join(Environment.NewLine, lines);
    }

    static string Parameters(TrialStatus t) => string.Join(", ", t.Parameters.Select(p => $"{p.Key} = {p.Value}"));
}
