// Every query of every Grafana dashboard, evaluated by the real Prometheus against a running cluster: each must parse, may
// name only metrics docs/metrics.md lists as emitted (or scraped by Prometheus itself), and must return data. Every
// panel shows something; none waits for a metric nobody records.
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using DeepSeekCluster.Deployment.Tests;
using Xunit.Abstractions;

namespace DeepSeekCluster.Observability.Tests;

[Collection(ClusterCollection.Name)]
public partial class DashboardQueryTests(RunningCluster cluster, ITestOutputHelper log)
{
    public static TheoryData<string> Dashboards()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.EnumerateFiles(Repository.PathOf("k8s", "grafana", "dashboards"), "*.json").Order())
            data.Add(Path.GetFileName(f));
        return data;
    }

    [Theory, MemberData(nameof(Dashboards))]
    public async Task EveryQueryParsesAndShowsDataFromTheRunningCluster(string file)
    {
        var dashboard = JsonNode.Parse(Repository.Read("k8s", "grafana", "dashboards", file))!.AsObject();
        var prometheus = cluster.Prometheus;
        var start = prometheus.StartedAt;
        var end = DateTimeOffset.UtcNow;
        // What Grafana would send for this time range: about 300 points, and $__rate_interval = max(interval + scrape, 4 × scrape).
        var step = TimeSpan.FromSeconds(Math.Max(PrometheusServer.ScrapeInterval.TotalSeconds, Math.Ceiling((end - start).TotalSeconds / 300)));
        var rateInterval = TimeSpan.FromSeconds(Math.Max(step.TotalSeconds + PrometheusServer.ScrapeInterval.TotalSeconds, 4 * PrometheusServer.ScrapeInterval.TotalSeconds));
        var builtins = new Dictionary<string, string>
        {
            ["__rate_interval"] = $"{rateInterval.TotalSeconds:F0}s",
            ["__interval"] = $"{step.TotalSeconds:F0}s",
            ["__range"] = $"{Math.Ceiling((end - start).TotalSeconds):F0}s",
        };

        var problems = new List<string>();
        var variables = new Dictionary<string, string>(builtins);
        // Template variables in order (a later one may use an earlier one), each resolved as Grafana's "All" would be.
        foreach (var v in dashboard["templating"]?["list"]?.AsArray() ?? [])
        {
            if (v?["type"]?.GetValue<string>() != "query") continue;
            var name = v["name"]!.GetValue<string>();
            var query = Substitute(v["query"] is JsonObject q ? q["query"]!.GetValue<string>() : v["query"]!.GetValue<string>(), variables);
            if (LabelValues().Match(query) is not { Success: true } m) { problems.Add($"variable '{name}': only label_values(selector, label) is supported here: {query}"); continue; }
            var values = await prometheus.LabelValuesAsync(m.Groups[2].Value, m.Groups[1].Value.Trim(), start, end);
            // A variable is a query too: only emitted metrics, and it must list values.
            if (NotEmitted(query) is { Count: > 0 } notEmitted) problems.Add($"variable '{name}': {string.Join(", ", notEmitted)} is not an emitted metric of docs/metrics.md");
            if (values.Count == 0) problems.Add($"variable '{name}': {query} has no values");
            variables[name] = values.Count == 0 ? ".*" : "(" + string.Join("|", values.Select(Regex.Escape)) + ")";
            log.WriteLine($"${name} = {variables[name]}");
        }

        int evaluated = 0, withData = 0;
        foreach (var (title, target) in Targets(dashboard))
        {
            var raw = target["expr"]?.GetValue<string>() ?? "";
            var expr = Substitute(raw, variables);
            var where = $"panel '{title}' target {target["refId"]}";
            bool instant = target["instant"]?.GetValue<bool>() == true && target["range"]?.GetValue<bool>() != true;
            var result = instant ? await prometheus.QueryAsync(expr, end) : await prometheus.QueryRangeAsync(expr, start, end, step);
            evaluated++;
            if (result.Error is not null) { problems.Add($"{where}: Prometheus refused {expr}: {result.Error}"); continue; }
            if (NotEmitted(raw) is { Count: > 0 } notEmitted) problems.Add($"{where}: {string.Join(", ", notEmitted)} is not an emitted metric of docs/metrics.md");
            if (HasFiniteSample(result.Series)) withData++;
            else problems.Add($"{where}: no data from the running cluster for {expr}");
        }
        log.WriteLine($"{file}: {evaluated} queries evaluated over {end - start:mm\\:ss} (step {step.TotalSeconds} s, rate interval {builtins["__rate_interval"]}): " +
                      $"{withData} returned data");
        Assert.True(evaluated > 0, $"{file} has no queries");
        Assert.True(problems.Count == 0, $"{file}:\n" + string.Join("\n", problems));
    }

    /// <summary>The names in the query that no emitted (or Prometheus-scraped) catalogue row exports: planned or unknown.</summary>
    internal static List<string> NotEmitted(string expr) =>
        PromQl.MetricNames(expr).Where(n => !MetricsCatalogue.Entries.Any(e => e.Status is "emitted" or "scrape" && e.SeriesNames.Contains(n))).ToList();


    internal static bool HasFiniteSample(JsonArray series) => series.Any(s =>
        (s?["values"]?.AsArray() ?? (s?["value"] is JsonArray one ? new JsonArray(one.DeepClone()) : []))
            .Any(v => double.TryParse(v![1]!.GetValue<string>(), System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var x) && double.IsFinite(x)));

    internal static IEnumerable<(string Title, JsonObject Target)> Targets(JsonObject dashboard)
    {
        foreach (var panel in Panels(dashboard["panels"]?.AsArray()))
            foreach (var t in panel["targets"]?.AsArray() ?? [])
                if (t is JsonObject target && target["hide"]?.GetValue<bool>() != true) yield return (panel["title"]?.GetValue<string>() ?? "?", target);
    }

    static IEnumerable<JsonObject> Panels(JsonArray? panels)
    {
        foreach (var p in panels ?? [])
        {
            if (p is not JsonObject panel) continue;
            yield return panel;
            foreach (var inner in Panels(panel["panels"]?.AsArray())) yield return inner; // collapsed rows
        }
    }

    /// <summary>$name and ${name} (and ${name:regex}) replaced; an unknown variable is left for Prometheus to refuse.</summary>
    static string Substitute(string expr, IReadOnlyDictionary<string, string> variables) =>
        Variable().Replace(expr, m => variables.TryGetValue(m.Groups["braced"].Success ? m.Groups["braced"].Value : m.Groups["bare"].Value, out var v) ? v : m.Value);

    [GeneratedRegex(@"\$\{(?<braced>\w+)(?::\w+)?\}|\$(?<bare>\w+)")] private static partial Regex Variable();
    [GeneratedRegex(@"^\s*label_values\s*\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")] private static partial Regex LabelValues();
}

/// <summary>The catalogue half of the check, without a cluster: no dashboard query names a planned (or unknown) metric.</summary>
public class DashboardCatalogueTests
{
    [Fact]
    public void NoDashboardQueryNamesAMetricThatIsNotEmitted()
    {
        var problems = new List<string>();
        int queries = 0;
        foreach (var file in Directory.EnumerateFiles(Repository.PathOf("k8s", "grafana", "dashboards"), "*.json").Order())
        {
            var dashboard = JsonNode.Parse(File.ReadAllText(file))!.AsObject();
            var exprs = DashboardQueryTests.Targets(dashboard).Select(t => (Where: $"panel '{t.Title}'", Expr: t.Target["expr"]?.GetValue<string>() ?? ""))
                .Concat((dashboard["templating"]?["list"]?.AsArray() ?? []).Where(v => v?["type"]?.GetValue<string>() == "query")
                    .Select(v => (Where: $"variable '{v!["name"]}'", Expr: v["query"] is JsonObject q ? q["query"]!.GetValue<string>() : v["query"]!.GetValue<string>())));
            foreach (var (where, expr) in exprs)
            {
                queries++;
                if (PromQl.MetricNames(expr).Count == 0) problems.Add($"{Path.GetFileName(file)} {where}: names no metric: {expr}");
                foreach (var n in DashboardQueryTests.NotEmitted(expr)) problems.Add($"{Path.GetFileName(file)} {where}: {n} is not an emitted metric of docs/metrics.md");
            }
        }
        Assert.True(queries > 40, $"only {queries} dashboard queries found");
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }
}
