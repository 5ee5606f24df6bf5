// docs/metrics.md is the contract: its rows follow the naming rules, every instrument in the code has a row, and each
// row's OpenTelemetry instrument really becomes the catalogued Prometheus name through the ServiceDefaults pipeline.
using System.Diagnostics.Metrics;
using System.Net;
using System.Text.RegularExpressions;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.Deployment.Tests;

public partial class MetricsCatalogueTests
{
    static readonly HashSet<string> ForbiddenLabels = new(StringComparer.Ordinal)
    {
        "step", "sample", "sample_id", "generation", "checkpoint", "path", "token", "error", "message", "rank",
        "job", // Prometheus's own target label: ours would be renamed exported_job
    };

    [Fact]
    public void TheCatalogueFollowsTheNamingRules()
    {
        var entries = MetricsCatalogue.Entries;
        Assert.True(entries.Count >= 40, $"only {entries.Count} catalogue rows parsed from docs/metrics.md");
        Assert.Equal(entries.Count, entries.Select(e => e.Name).Distinct().Count());
        var problems = new List<string>();
        foreach (var e in entries)
        {
            if (e.Kind is not ("Counter" or "Gauge" or "ObservableGauge" or "UpDownCounter" or "Histogram")) problems.Add($"{e.Name}: kind '{e.Kind}'");
            if (e.Status is not ("emitted" or "planned" or "scrape")) problems.Add($"{e.Name}: status '{e.Status}'");
            if (!e.IsOurs) continue;
            if (e.Kind == "Counter" && !e.Name.EndsWith("_total", StringComparison.Ordinal)) problems.Add($"{e.Name}: a counter ends in _total");
            if (e.Unit == "s" && !e.Name.EndsWith("_seconds", StringComparison.Ordinal)) problems.Add($"{e.Name}: seconds belong in the name");
            if (e.Unit == "By" && !e.Name.Contains("bytes")) problems.Add($"{e.Name}: bytes belong in the name");
            if (e.Unit == "1" && !e.Name.EndsWith("_ratio", StringComparison.Ordinal)) problems.Add($"{e.Name}: a unit-1 value is a _ratio");
            foreach (var l in e.Labels.Where(ForbiddenLabels.Contains)) problems.Add($"{e.Name}: label '{l}' is unbounded or reserved");
        }
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [Fact]
    public void EveryInstrumentInTheSourcesHasItsCatalogueRow()
    {
        var byInstrument = MetricsCatalogue.Entries.Where(e => e.Instrument is not null).ToDictionary(e => e.Instrument!);
        var found = new List<string>();
        var problems = new List<string>();
        foreach (var project in new[] { "Coordinator", "GpuWorker", "DataShardService", "CheckpointStore", "Training", "ServiceDefaults", "ModelServer" })
            foreach (var file in Repository.SourcesOf(project))
                foreach (Match m in Instrument().Matches(File.ReadAllText(file)))
                {
                    string kind = m.Groups[1].Value, name = m.Groups[2].Value;
                    string? unit = m.Groups[3].Success ? m.Groups[3].Value : null;
                    found.Add(name);
                    if (!byInstrument.TryGetValue(name, out var row)) { problems.Add($"{Path.GetFileName(file)}: instrument '{name}' has no row in docs/metrics.md"); continue; }
                    if (row.Unit != unit) problems.Add($"{name}: unit '{unit}' in the code, '{row.Unit}' in the catalogue");
                    if (row.Kind != kind) problems.Add($"{name}: {kind} in the code, {row.Kind} in the catalogue");
                    if (row.Status != "emitted") problems.Add($"{name}: the code records it, so its status is emitted, not {row.Status}");
                }
        Assert.Contains("deepseek.data.samples_served", found); // the scan sees the instruments we know exist
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [GeneratedRegex(@"Create(Counter|Histogram|Gauge|UpDownCounter|ObservableGauge|ObservableCounter|ObservableUpDownCounter)<\w+>\(\s*""([^""]+)""(?:\s*,\s*""([^""]*)"")?")]
    private static partial Regex Instrument();

    [Fact]
    public async Task InstrumentNamesBecomeTheCataloguedPrometheusNames()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.AddBasicServiceDefaults();
        await using var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapGet("/throw", () => { try { throw new InvalidOperationException("counted"); } catch (InvalidOperationException) { } return "ok"; });

        using var meter = new Meter(ServiceDefaultsExtensions.TelemetryPrefix + ".CatalogueCheck");
        foreach (var e in MetricsCatalogue.Entries.Where(e => e.IsOurs)) Record(meter, e);

        await app.StartAsync();
        try
        {
            string url = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
            using var http = new HttpClient { BaseAddress = new Uri(url) };
            Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("/alive")).StatusCode);
            await http.GetStringAsync("/throw");
            GC.Collect();

            var expected = MetricsCatalogue.Entries.Where(e => e.Instrument is not null).ToList();
            Dictionary<string, string> types = new();
            // The exporter caches a scrape briefly, and the runtime's observable instruments appear from the first collection on.
            for (int attempt = 0; attempt < 20; attempt++)
            {
                string text = await http.GetStringAsync("/metrics");
                types = TypeLine().Matches(text).ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value);
                if (expected.All(e => types.ContainsKey(e.Name))) break;
                await Task.Delay(250);
            }
            var problems = new List<string>();
            foreach (var e in expected)
            {
                if (!types.TryGetValue(e.Name, out var type))
                {
                    string? near = types.Keys.FirstOrDefault(k => k.StartsWith(e.Name.Split('_')[0] + "_" + e.Name.Split('_')[1], StringComparison.Ordinal) && Similar(k, e.Name));
                    problems.Add($"{e.Instrument} ({e.Unit}) is not exported as {e.Name}" + (near is null ? "" : $"; /metrics has {near}"));
                }
                else if (type != e.PrometheusType) problems.Add($"{e.Name}: exported as {type}, catalogued as {e.PrometheusType}");
            }
            Assert.True(problems.Count == 0, string.Join("\n", problems));
        }
        finally
        {
            await app.StopAsync();
        }
    }

    static bool Similar(string a, string b) => a.Replace("_total", "").Contains(b.Replace("_total", "")[..Math.Min(b.Length - 6, 18)], StringComparison.Ordinal);

    /// <summary>Creates the row's instrument (dotted name, unit) and records one value with every catalogued label.</summary>
    static void Record(Meter meter, CatalogueEntry e)
    {
        var tags = e.Labels.Select(l => new KeyValuePair<string, object?>(l, "x")).ToArray();
        switch (e.Kind)
        {
            case "Counter": meter.CreateCounter<long>(e.Instrument!, e.Unit).Add(1, tags); break;
            case "UpDownCounter": meter.CreateUpDownCounter<long>(e.Instrument!, e.Unit).Add(1, tags); break;
            case "Gauge": meter.CreateGauge<double>(e.Instrument!, e.Unit).Record(0.5, tags); break;
            case "Histogram": meter.CreateHistogram<double>(e.Instrument!, e.Unit).Record(0.5, tags); break;
            case "ObservableGauge": meter.CreateObservableGauge(e.Instrument!, () => new Measurement<double>(0.5, tags), e.Unit); break;
            default: throw new InvalidOperationException($"{e.Name}: kind {e.Kind}");
        }
    }

    [GeneratedRegex(@"^# TYPE (\S+) (\S+)", RegexOptions.Multiline)]
    private static partial Regex TypeLine();
}
