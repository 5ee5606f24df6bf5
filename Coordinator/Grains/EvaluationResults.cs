// Reads the scores out of a checkpoint evaluation's results JSON (lm-evaluation-harness's shape, written by the
// worker's HarnessResults): "results".<task>."<metric>,<filter>" numbers and their "<metric>_stderr,<filter>" beside them.
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public static class EvaluationResults
{
    /// <summary>Every numeric metric of every task; a report that is not such a document is refused naming the step.</summary>
    public static List<EvaluationScore> Parse(long step, string json)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("results", out var results) || results.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"the evaluation of step {step} has no \"results\" object");
            var scores = new List<EvaluationScore>();
            foreach (var task in results.EnumerateObject())
            {
                if (task.Value.ValueKind != JsonValueKind.Object) continue;
                foreach (var m in task.Value.EnumerateObject())
                {
                    var comma = m.Name.IndexOf(',');
                    if (comma < 0 || m.Value.ValueKind != JsonValueKind.Number) continue;
                    string metric = m.Name[..comma], filter = m.Name[comma..];
                    if (metric.EndsWith("_stderr", StringComparison.Ordinal)) continue;
                    double? stderr = task.Value.TryGetProperty(metric + "_stderr" + filter, out var se) && se.ValueKind == JsonValueKind.Number ? se.GetDouble() : null;
                    scores.Add(new EvaluationScore(step, task.Name, metric, m.Value.GetDouble(), stderr));
                }
            }
            return scores;
        }
        catch (JsonException e) { throw new InvalidDataException($"the evaluation of step {step} is not JSON: {e.Message}", e); }
    }
}
