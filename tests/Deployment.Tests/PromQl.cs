// The metric names a PromQL expression (as Grafana stores it) refers to. Not a parser: it removes what cannot be a
// metric name — strings, label matchers, grouping clauses, ranges, Grafana variables, numbers — and what remains,
// less PromQL's functions and keywords, are metric names.
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Deployment.Tests;

public static partial class PromQl
{
    static readonly HashSet<string> Words = new(StringComparer.Ordinal)
    {
        // aggregations and their modifiers
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
        "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
        "and", "or", "unless", "atan2",
        // functions
        "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
        "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
        "histogram_count", "histogram_sum", "histogram_fraction", "holt_winters", "hour", "idelta", "increase", "irate",
        "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
        "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
        "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
        "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
        // Grafana's templating functions
        "label_values", "label_names", "metrics", "query_result",
    };

    public static IReadOnlySet<string> MetricNames(string expression)
    {
        string e = expression;
        e = GrafanaVariable().Replace(e, " ");
        e = StringLiteral().Replace(e, " ");
        e = LabelMatchers().Replace(e, " ");
        e = Grouping().Replace(e, " ");
        e = Range().Replace(e, " ");
        e = Number().Replace(e, " ");
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (Match m in Identifier().Matches(e))
            if (!Words.Contains(m.Value)) names.Add(m.Value);
        // label_values(metric, label): the second argument is a label, not a metric.
        foreach (Match m in LabelValuesLabel().Matches(expression)) names.Remove(m.Groups[1].Value);
        return names;
    }

    [GeneratedRegex(@"\$\{[^}]*\}|\$\w+")] private static partial Regex GrafanaVariable();
    [GeneratedRegex("\"(?:[^\"\\\\]|\\\\.)*\"|'(?:[^'\\\\]|\\\\.)*'")] private static partial Regex StringLiteral();
    [GeneratedRegex(@"\{[^}]*\}")] private static partial Regex LabelMatchers();
    [GeneratedRegex(@"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")] private static partial Regex Grouping();
    [GeneratedRegex(@"\[[^\]]*\]")] private static partial Regex Range();
    [GeneratedRegex(@"(?<![A-Za-z_:])\d+(?:\.\d+)?(?:e[+-]?\d+)?")] private static partial Regex Number();
    [GeneratedRegex(@"[A-Za-z_:][A-Za-z0-9_:]*")] private static partial Regex Identifier();
    [GeneratedRegex(@"label_values\s*\([^,()]*(?:\([^)]*\))?[^,()]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")] private static partial Regex LabelValuesLabel();
}
