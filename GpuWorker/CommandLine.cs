// A small --key value parser with errors that name the option; enough for the worker's verbs.
namespace DeepSeekCluster.GpuWorker;

public sealed class CommandLine
{
    readonly Dictionary<string, List<string>> values = new(StringComparer.Ordinal);
    readonly HashSet<string> flags = new(StringComparer.Ordinal);
    readonly HashSet<string> used = new(StringComparer.Ordinal);

    public CommandLine(IEnumerable<string> args, IReadOnlySet<string> flagNames)
    {
        string? key = null;
        foreach (var a in args)
        {
            if (a.StartsWith("--", StringComparison.Ordinal))
            {
                var name = a[2..];
                var eq = name.IndexOf('=');
                if (eq > 0) { Add(name[..eq], name[(eq + 1)..]); key = null; continue; }
                if (flagNames.Contains(name)) { flags.Add(name); key = null; continue; }
                key = name;
                if (!values.ContainsKey(key)) values[key] = new List<string>();
            }
            else if (key is null) throw new ArgumentException($"unexpected argument '{a}': options look like --name value");
            else values[key].Add(a);
        }
        foreach (var (k, v) in values)
            if (v.Count == 0) throw new ArgumentException($"option --{k} needs a value");
    }

    void Add(string k, string v)
    {
        if (!values.TryGetValue(k, out var list)) values[k] = list = new List<string>();
        list.Add(v);
    }

    public bool Flag(string name) { used.Add(name); return flags.Contains(name); }

    public string? String(string name) { used.Add(name); return values.TryGetValue(name, out var v) ? v[^1] : null; }

    public IReadOnlyList<string> Strings(string name) { used.Add(name); return values.TryGetValue(name, out var v) ? v : []; }

    public T Get<T>(string name, T fallback) where T : IParsable<T>
    {
        var s = String(name);
        if (s is null) return fallback;
        return T.TryParse(s, System.Globalization.CultureInfo.InvariantCulture, out var v)
            ? v : throw new ArgumentException($"option --{name}: '{s}' is not a valid {typeof(T).Name.ToLowerInvariant()}");
    }

    /// <summary>Fails on options nobody asked for, so a typo is never silently ignored.</summary>
    public void RejectUnknown()
    {
        var unknown = values.Keys.Concat(flags).Where(k => !used.Contains(k)).ToList();
        if (unknown.Count > 0) throw new ArgumentException($"unknown option(s): {string.Join(", ", unknown.Select(u => "--" + u))}");
    }
}
