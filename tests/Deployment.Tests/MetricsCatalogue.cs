// docs/metrics.md read as data: every table row whose first cell is a backticked metric name.
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Deployment.Tests;

/// <param name="Name">Prometheus name as scraped (histograms: the base name, without _bucket/_sum/_count).</param>
/// <param name="Kind">OpenTelemetry instrument kind: Counter, Gauge, ObservableGauge, UpDownCounter, Histogram.</param>
/// <param name="Instrument">OpenTelemetry instrument name, or null where none exists (Prometheus's own series).</param>
/// <param name="Unit">UCUM unit, or null.</param>
/// <param name="Status">emitted, planned or scrape.</param>
public sealed record CatalogueEntry(string Name, string Kind, string? Instrument, string? Unit, IReadOnlyList<string> Labels, string Status, string Section)
{
    public bool IsOurs => Instrument is not null && Name.StartsWith("deepseek_", StringComparison.Ordinal);

    /// <summary>The series names a query may use: a histogram's _bucket/_sum/_count, anything else as is.</summary>
    public IEnumerable<string> SeriesNames => Kind == "Histogram" ? [Name + "_bucket", Name + "_sum", Name + "_count"] : [Name];

    /// <summary>The TYPE the Prometheus exposition declares for it.</summary>
    public string PrometheusType => Kind switch
    {
        "Counter" => "counter",
        "Histogram" => "histogram",
        _ => "gauge",
    };
}

public static partial class MetricsCatalogue
{
    public static IReadOnlyList<CatalogueEntry> Entries { get; } = Parse(Repository.Read("docs", "metrics.md"));

    public static IReadOnlySet<string> SeriesNames { get; } = Entries.SelectMany(e => e.SeriesNames).ToHashSet(StringComparer.Ordinal);

    public static IReadOnlyList<CatalogueEntry> Parse(string markdown)
    {
        var entries = new List<CatalogueEntry>();
        string section = "";
        foreach (var raw in markdown.Split('\n'))
        {
            var line = raw.TrimEnd('\r');
            if (line.StartsWith("## ", StringComparison.Ordinal)) section = line[3..].Trim();
            if (!line.StartsWith("| `", StringComparison.Ordinal)) continue;
            var cells = line.Trim().Trim('|').Split('|').Select(c => c.Trim()).ToArray();
            if (cells.Length != 7)
                throw new FormatException($"docs/metrics.md: a catalogue row needs 7 cells (metric | instrument kind | OpenTelemetry name | unit | labels | status | meaning), got {cells.Length}: {line}");
            entries.Add(new CatalogueEntry(
                Name: Code(cells[0]) ?? throw new FormatException($"docs/metrics.md: no metric name in {line}"),
                Kind: cells[1],
                Instrument: Code(cells[2]),
                Unit: Code(cells[3]),
                Labels: cells[4] is "—" or "" ? [] : cells[4].Split(',').Select(l => l.Trim()).ToArray(),
                Status: cells[5],
                Section: section));
        }
        return entries;
    }

    static string? Code(string cell) => CodeSpan().Match(cell) is { Success: true } m ? m.Groups[1].Value : null;

    [GeneratedRegex("^`([^`]+)`$")]
    private static partial Regex CodeSpan();
}
