// How a tokens-per-second figure reads on a progress line ("412 tok/s", "12.3k tok/s", "1.23M tok/s"): the one format the
// standalone trainer and the AppHost print. Here, in the torch-free library both reference; not a metric (the metrics
// export the raw figure).
using System.Globalization;

namespace DeepSeekCluster.Text.Display;

public static class TokenThroughput
{
    /// <summary>What the figure reads as when there is none (nothing measured yet, or a non-finite value).</summary>
    public const string Missing = "tok/s -";

    static readonly (double Scale, string Prefix)[] Prefixes = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];

    /// <summary>
    /// Three significant digits at any size, with an SI prefix above a thousand: a CPU run's few hundred tokens/s
    /// must not read as "0.3k" (or "0.0k"), nor a GPU cluster's millions as "1234.6k".
    /// </summary>
    public static string Format(double tokensPerSecond)
    {
        if (!double.IsFinite(tokensPerSecond) || tokensPerSecond < 0) return Missing;
        // Rounded before the prefix is chosen, so 999.7 reads "1.00k", not "1000".
        double value = RoundToSignificant(tokensPerSecond, 3);
        foreach (var (scale, prefix) in Prefixes)
            if (value >= scale) return Digits(value / scale) + prefix + " tok/s";
        return (value == 0 ? "0" : Digits(value)) + " tok/s";
    }

    /// <summary>A value already rounded to three significant digits, printed with exactly those (trailing zeros kept).</summary>
    static string Digits(double v) => v.ToString(v >= 100 ? "F0" : v >= 10 ? "F1" : v >= 1 ? "F2" : "G3", CultureInfo.InvariantCulture);

    static double RoundToSignificant(double v, int digits)
    {
        if (v == 0) return 0;
        double unit = Math.Pow(10, Math.Floor(Math.Log10(v)) - (digits - 1));
        return Math.Round(v / unit) * unit;
    }
}
