// The one reader of a bench verb's options: each read records the option as one the verb knows, and Done() refuses
// every other --option, so a typo or another verb's option stops the run instead of being measured around. It is not
// a general command-line parser: options are `--name value` or a bare `--flag`, nothing else (no --name=value, no
// short forms but -h).
using System.Globalization;

namespace DeepSeekCluster.Bench;

/// <summary>Ends the bench before any work: a refused command line (exit 2, on stderr) or --help/--dry-run (exit 0, on stdout).</summary>
sealed class BenchExit(string message, int exitCode) : Exception(message)
{
    public int ExitCode { get; } = exitCode;
}

/// <summary>A verb's options, read once each at the top of its Run, then checked by <see cref="Done"/>.</summary>
sealed class BenchArgs(string verb, string[] args)
{
    const string Help = "--help", ShortHelp = "-h", DryRun = "--dry-run";

    /// <summary>Every option read so far, with its default as --help shows it and the value this run uses.</summary>
    readonly SortedDictionary<string, (string Default, string Value)> known = new(StringComparer.Ordinal);
    readonly HashSet<int> consumed = [];
    bool done;

    public string Verb => verb;

    /// <summary>The value of <paramref name="name"/>, or <paramref name="fallback"/> when it is not given.</summary>
    public string String(string name, string fallback) => Read(name, fallback, v => v, fallback);

    /// <summary>The value of <paramref name="name"/>, or null when it is not given (an option with no default).</summary>
    public string? Optional(string name) => Read<string?>(name, "none", v => v, null);

    /// <summary>One of <paramref name="allowed"/>; anything else is refused rather than read as the fallback.</summary>
    public string Choice(string name, string fallback, params string[] allowed) =>
        Read(name, fallback, v => allowed.Contains(v) ? v : throw Bad(name, v, $"one of {string.Join(", ", allowed)}"), fallback);

    public int Int(string name, int fallback, int min = int.MinValue) =>
        Read(name, fallback.ToString(CultureInfo.InvariantCulture), v => ParseInt(name, v, min), fallback);

    /// <summary>An integer option with no default: null when it is not given.</summary>
    public int? OptionalInt(string name, int min = int.MinValue) => Read<int?>(name, "none", v => ParseInt(name, v, min), null);

    /// <summary>A number strictly above <paramref name="above"/> (by default any finite number).</summary>
    public double Double(string name, double fallback, double above = double.NegativeInfinity) =>
        Read(name, fallback.ToString(CultureInfo.InvariantCulture), v =>
            double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && double.IsFinite(d) && d > above
                ? d : throw Bad(name, v, double.IsNegativeInfinity(above) ? "a number" : $"a number above {above.ToString(CultureInfo.InvariantCulture)}"), fallback);

    /// <summary>true or false, spelled out (a bare option is not true: the value is required).</summary>
    public bool Bool(string name, bool fallback) =>
        Read(name, fallback ? "true" : "false", v => v switch { "true" => true, "false" => false, _ => throw Bad(name, v, "true or false") }, fallback);

    /// <summary>A comma-separated list (empty entries dropped, entries trimmed); an empty list is refused.</summary>
    public string[] List(string name, string fallback) => Read(name, fallback, v => SplitList(name, v), SplitList(name, fallback));

    public int[] Ints(string name, string fallback, int min = int.MinValue) =>
        Read(name, fallback, v => SplitList(name, v).Select(x => ParseInt(name, x, min)).ToArray(),
             SplitList(name, fallback).Select(x => ParseInt(name, x, min)).ToArray());

    /// <summary>A bare --flag: true when given. It takes no value, so a token after it that is not an option is refused by Done.</summary>
    public bool Flag(string name)
    {
        CheckOpen(name);
        int i = IndexOf(name);
        known[name] = ("off", i >= 0 ? "on" : "off");
        if (i >= 0) consumed.Add(i);
        return i >= 0;
    }

    /// <summary>
    /// Ends the reading: --help prints the options read, with their defaults (exit 0); otherwise every token no read
    /// consumed is refused (exit 2, naming the verb, the tokens and the options the verb reads); then --dry-run prints
    /// the values this run would use (exit 0). All before the bench starts. Any read after this throws, so an option
    /// read late cannot slip past.
    /// </summary>
    public void Done()
    {
        CheckOpen("Done");
        done = true;
        bool help = args.Contains(Help) || args.Contains(ShortHelp), dryRun = args.Contains(DryRun);
        var options = string.Join(", ", known.Keys);
        if (help)
            throw new BenchExit($"bench {verb} reads:\n" + string.Join("\n", known.Select(o => $"  {o.Key,-22} default {o.Value.Default}")) +
                                $"\n  {DryRun,-22} print the values a run would use, then exit without running", 0);
        var unknown = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (consumed.Contains(i) || args[i] == DryRun) continue;
            if (!IsOption(args[i])) unknown.Add($"stray value '{args[i]}' (no option before it takes a value)");
            else if (i + 1 < args.Length && !IsOption(args[i + 1]) && !consumed.Contains(i + 1)) unknown.Add($"unknown option {args[i]} (given {args[++i]})");
            else unknown.Add($"unknown option {args[i]}");
        }
        if (unknown.Count > 0)
            throw new BenchExit($"bench {verb}: {string.Join("; ", unknown)}. {verb} reads: {(options.Length > 0 ? options : "no options")} " +
                                $"(bench {verb} --help gives their defaults)", 2);
        if (dryRun)
            throw new BenchExit($"bench {verb} --dry-run, the values this run would use:\n" +
                                string.Join("\n", known.Select(o => $"  {o.Key,-22} {o.Value.Value}{(o.Value.Value == o.Value.Default ? "" : $"  (default {o.Value.Default})")}")), 0);
    }

    // ---- Reading one option ----

    T Read<T>(string name, string shownDefault, Func<string, T> parse, T fallback)
    {
        CheckOpen(name);
        int i = IndexOf(name);
        if (i < 0)
        {
            known[name] = (shownDefault, Show(fallback));
            return fallback;
        }
        // A value that is an option means the value was left out.
        if (i + 1 >= args.Length || IsOption(args[i + 1]))
            throw new BenchExit($"bench {verb}: option {name} needs a value{(i + 1 < args.Length ? $", but is followed by {args[i + 1]}" : " (it ends the command line)")}", 2);
        consumed.Add(i);
        consumed.Add(i + 1);
        var value = parse(args[i + 1]);
        known[name] = (shownDefault, Show(value));
        return value;
    }

    /// <summary>An option's name; "-10" (a negative nice) is a value, so only "--" marks one.</summary>
    static bool IsOption(string token) => token.StartsWith("--", StringComparison.Ordinal);

    int IndexOf(string name)
    {
        if (!IsOption(name)) throw new ArgumentException($"option names start with --, got '{name}'", nameof(name));
        int first = Array.IndexOf(args, name);
        if (first >= 0 && Array.IndexOf(args, name, first + 1) > first)
            throw new BenchExit($"bench {verb}: option {name} is given twice; give it once", 2);
        return first;
    }

    void CheckOpen(string what)
    {
        if (done) throw new InvalidOperationException($"bench {verb}: {what} read after Done(): every option must be read before the unknown ones are refused");
    }

    static string Show<T>(T value) => value switch
    {
        null => "none",
        string s => s,
        bool b => b ? "true" : "false",
        double d => d.ToString(CultureInfo.InvariantCulture),
        IEnumerable<string> l => string.Join(",", l),
        IEnumerable<int> l => string.Join(",", l.Select(x => x.ToString(CultureInfo.InvariantCulture))),
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => value.ToString() ?? "",
    };

    int ParseInt(string name, string v, int min) =>
        int.TryParse(v, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var n) && n >= min
            ? n : throw Bad(name, v, min == int.MinValue ? "an integer" : $"an integer >= {min}");

    string[] SplitList(string name, string v) =>
        v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) is { Length: > 0 } items
            ? items : throw Bad(name, v, "a comma-separated list of one or more values");

    BenchExit Bad(string name, string value, string expected) => new($"bench {verb}: option {name}: '{value}' is not {expected}", 2);
}
