// The Grafana dashboards: valid JSON, and every query names only metrics of docs/metrics.md. (That each query returns
// data from a running cluster is the live Prometheus test of issue 8, not this one.)
using System.Text.Json.Nodes;

namespace DeepSeekCluster.Deployment.Tests;

public class DashboardTests
{
    public static TheoryData<string> Dashboards()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.EnumerateFiles(Repository.PathOf("k8s", "grafana", "dashboards"), "*.json").Order())
            data.Add(Path.GetFileName(f));
        return data;
    }

    static JsonObject Load(string file) =>
        JsonNode.Parse(Repository.Read("k8s", "grafana", "dashboards", file))?.AsObject()
        ?? throw new InvalidDataException($"{file} is not a JSON object");

    /// <summary>(where, expression) of every panel target and every query variable.</summary>
    static IEnumerable<(string Where, string Expr)> Queries(JsonObject dashboard)
    {
        foreach (var panel in Panels(dashboard["panels"]?.AsArray()))
            foreach (var t in panel["targets"]?.AsArray() ?? [])
                yield return ($"panel '{panel["title"]}' target {t?["refId"]}", t?["expr"]?.GetValue<string>() ?? "");
        foreach (var v in dashboard["templating"]?["list"]?.AsArray() ?? [])
            if (v?["type"]?.GetValue<string>() == "query")
                yield return ($"variable '{v["name"]}'", v["query"] is JsonObject q ? q["query"]!.GetValue<string>() : v["query"]!.GetValue<string>());
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

    [Theory, MemberData(nameof(Dashboards))]
    public void EveryQueryNamesOnlyCataloguedMetrics(string file)
    {
        var dashboard = Load(file);
        var problems = new List<string>();
        foreach (var (where, expr) in Queries(dashboard))
        {
            var names = PromQl.MetricNames(expr);
            if (names.Count == 0) problems.Add($"{where}: no metric in '{expr}'");
            foreach (var n in names.Where(n => !MetricsCatalogue.SeriesNames.Contains(n)))
                problems.Add($"{where}: '{n}' is not in docs/metrics.md ({expr})");
        }
        Assert.True(problems.Count == 0, $"{file}:\n" + string.Join("\n", problems));
    }

    [Theory, MemberData(nameof(Dashboards))]
    public void EveryPanelHasAQueryAndTheDatasourceVariable(string file)
    {
        var dashboard = Load(file);
        Assert.False(string.IsNullOrWhiteSpace(dashboard["uid"]?.GetValue<string>()), $"{file}: no uid (provisioned dashboards need a stable one)");
        Assert.Contains(dashboard["templating"]!["list"]!.AsArray(), v => v?["type"]?.GetValue<string>() == "datasource");
        var ids = new HashSet<int>();
        foreach (var panel in Panels(dashboard["panels"]?.AsArray()))
        {
            Assert.True(ids.Add(panel["id"]!.GetValue<int>()), $"{file}: panel id {panel["id"]} repeats");
            if (panel["type"]?.GetValue<string>() == "row") continue;
            Assert.True((panel["targets"]?.AsArray().Count ?? 0) > 0, $"{file}: panel '{panel["title"]}' has no query");
            Assert.Equal("${datasource}", panel["datasource"]?["uid"]?.GetValue<string>());
        }
    }

    [Fact]
    public void TheDashboardsCoverEveryAreaOfTheCatalogue()
    {
        // Every deepseek_* metric appears in some dashboard, so nothing the cluster measures is invisible.
        var used = Directory.EnumerateFiles(Repository.PathOf("k8s", "grafana", "dashboards"), "*.json")
            .SelectMany(f => Queries(Load(Path.GetFileName(f)))).SelectMany(q => PromQl.MetricNames(q.Expr)).ToHashSet();
        var unused = MetricsCatalogue.Entries.Where(e => e.IsOurs && !e.SeriesNames.Any(used.Contains)).Select(e => e.Name).ToList();
        Assert.True(unused.Count == 0, "catalogued but on no dashboard: " + string.Join(", ", unused));
    }

    [Fact]
    public void TheGrafanaKustomizationCarriesEveryDashboardAndTheProvisioning()
    {
        var maps = Kustomize.Objects("k8s/grafana").OfType<k8s.Models.V1ConfigMap>().ToDictionary(m => m.Metadata.Name);
        var dashboards = maps["deepseek-grafana-dashboards"];
        Assert.Equal("1", dashboards.Metadata.Labels["grafana_dashboard"]);
        foreach (var f in Directory.EnumerateFiles(Repository.PathOf("k8s", "grafana", "dashboards"), "*.json"))
            Assert.True(dashboards.Data.ContainsKey(Path.GetFileName(f)), $"{Path.GetFileName(f)} is not in the dashboards ConfigMap");
        Assert.Contains("prometheus.yaml", maps["deepseek-grafana-datasources"].Data.Keys);
        var provider = maps["deepseek-grafana-providers"].Data["deepseek.yaml"];
        Assert.Contains("/var/lib/grafana/dashboards/deepseek", provider);
        // The datasource uid the provisioning declares is the one the dashboards fall back to.
        Assert.Contains("uid: prometheus", maps["deepseek-grafana-datasources"].Data["prometheus.yaml"]);
    }

    [Theory]
    [InlineData("sum by (phase, le) (rate(deepseek_train_step_seconds_bucket{training_job=~\"$training_job\"}[$__rate_interval]))", "deepseek_train_step_seconds_bucket")]
    [InlineData("label_values(deepseek_moe_expert_load_ratio{training_job=~\"$training_job\"}, layer)", "deepseek_moe_expert_load_ratio")]
    [InlineData("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / on(pod) group_left b", "a_bucket,b")]
    public void MetricNamesAreFoundInPromQl(string expr, string expected) =>
        Assert.Equal(expected.Split(',').Order(), PromQl.MetricNames(expr).Order());
}
