// The filters, tests, global functions and string/mapping methods chat templates use, and the arithmetic operators.
// The name sets are what the parser accepts at load; anything else is refused there, not at request time.
using System.Globalization;
using System.Text;

namespace DeepSeekCluster.ModelServer.Templates;

public static class TemplateBuiltins
{
    public static readonly HashSet<string> Filters =
        ["trim", "length", "count", "tojson", "first", "last", "default", "d", "upper", "lower", "capitalize", "title", "string", "int", "float",
         "join", "replace", "list", "items", "reverse", "safe"];
    public static readonly HashSet<string> Tests =
        ["defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "true", "false", "mapping", "iterable", "sequence",
         "even", "odd", "equalto", "eq"];
    public static readonly HashSet<string> Functions = ["raise_exception", "namespace", "range", "dict", "strftime_now"];
    public static readonly HashSet<string> Methods =
        ["strip", "lstrip", "rstrip", "split", "startswith", "endswith", "upper", "lower", "replace", "title", "capitalize", "find",
         "items", "keys", "values", "get"];

    static TemplateRuntimeException Fail(Position at, string message) => new($"{at}: {message}");

    static object? Arg((List<object?> Positional, Dictionary<string, object?> Named) args, int index, string name, object? otherwise) =>
        index < args.Positional.Count ? args.Positional[index] : args.Named.TryGetValue(name, out var v) ? v : otherwise;

    static string Text(object? v, Position at, string what) =>
        v is string s ? s : throw Fail(at, $"{what} needs a string, got {TemplateValues.TypeName(v)}");

    // ---- Operators ----

    public static object? Arithmetic(string op, object? a, object? b, Position at)
    {
        if (op == "~") return TemplateValues.Str(a) + TemplateValues.Str(b);
        if (a is Undefined ua) throw Fail(at, $"'{ua.Name}' is undefined");
        if (b is Undefined ub) throw Fail(at, $"'{ub.Name}' is undefined");
        if (a is long x && b is long y && (op is "+" or "-" or "*" or "//" or "%" || (op == "**" && y >= 0)))
            return op switch
            {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                "**" => (long)Math.Pow(x, y),
                _ when y == 0 => throw Fail(at, "integer division or modulo by zero"),
                "//" => (long)Math.Floor((double)x / y),
                _ => ((x % y) + y) % y,
            };
        if (TemplateValues.IsNumber(a) && TemplateValues.IsNumber(b))
        {
            double p = Convert.ToDouble(a is bool ba ? (ba ? 1 : 0) : a, CultureInfo.InvariantCulture);
            double q = Convert.ToDouble(b is bool bb ? (bb ? 1 : 0) : b, CultureInfo.InvariantCulture);
            return op switch
            {
                "+" => p + q,
                "-" => p - q,
                "*" => p * q,
                "/" => q == 0 ? throw Fail(at, "division by zero") : p / q,
                "//" => q == 0 ? throw Fail(at, "division by zero") : Math.Floor(p / q),
                "%" => q == 0 ? throw Fail(at, "modulo by zero") : p - q * Math.Floor(p / q),
                _ => Math.Pow(p, q),
            };
        }
        return (op, a, b) switch
        {
            ("+", string s, string t) => s + t,
            ("+", List<object?> l, List<object?> m) => l.Concat(m).ToList(),
            ("*", string s, long n) => string.Concat(Enumerable.Repeat(s, (int)Math.Max(0, n))),
            ("*", List<object?> l, long n) => Enumerable.Repeat(l, (int)Math.Max(0, n)).SelectMany(x => x).ToList(),
            _ => throw Fail(at, $"unsupported operand types for {op}: '{TemplateValues.TypeName(a)}' and '{TemplateValues.TypeName(b)}'"),
        };
    }

    // ---- Filters ----

    public static object? Filter(string name, object? v, (List<object?> Positional, Dictionary<string, object?> Named) args, Position at)
    {
        switch (name)
        {
            case "default" or "d":
                bool boolean = TemplateValues.Truthy(Arg(args, 1, "boolean", false));
                return v is Undefined || (boolean && !TemplateValues.Truthy(v)) ? Arg(args, 0, "default_value", "") : v;
            case "tojson":
                return TemplateValues.ToJson(v is Undefined u ? throw Fail(at, $"'{u.Name}' is undefined") : v,
                    Arg(args, 0, "indent", null) is long indent ? (int)indent : null, at);
            case "length" or "count":
                return v switch
                {
                    string s => (long)s.EnumerateRunes().Count(),
                    List<object?> l => (long)l.Count,
                    OrderedDictionary<string, object?> m => (long)m.Count,
                    Undefined => 0L,
                    _ => throw Fail(at, $"{TemplateValues.TypeName(v)} has no length"),
                };
            case "first" or "last":
                var items = TemplateValues.Items(v, at);
                return items.Count == 0 ? new Undefined($"{name} of an empty sequence") : name == "first" ? items[0] : items[^1];
            case "list": return TemplateValues.Items(v, at).ToList();
            case "reverse": return v is string rs ? string.Concat(rs.EnumerateRunes().Reverse()) : Enumerable.Reverse(TemplateValues.Items(v, at)).ToList();
            case "items":
                return v is OrderedDictionary<string, object?> map ? map.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList()
                    : v is Undefined ? [] : throw Fail(at, $"'items' needs a mapping, got {TemplateValues.TypeName(v)}");
            case "join":
                string sep = TemplateValues.Str(Arg(args, 0, "d", ""));
                return string.Join(sep, TemplateValues.Items(v, at).Select(TemplateValues.Str));
            case "safe": return v;
            case "int":
                return v switch
                {
                    long n => n,
                    double d => (long)Math.Truncate(d),
                    bool b => b ? 1L : 0L,
                    string s when long.TryParse(s.Trim(), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var n) => n,
                    _ => Arg(args, 0, "default", 0L),
                };
            case "float":
                return v switch
                {
                    long n => (double)n,
                    double d => d,
                    string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) => d,
                    _ => Arg(args, 0, "default", 0.0),
                };
        }
        string str = TemplateValues.Str(v);
        return name switch
        {
            "trim" => Arg(args, 0, "chars", null) is string chars ? str.Trim(chars.ToCharArray()) : str.Trim(),
            "upper" => str.ToUpperInvariant(),
            "lower" => str.ToLowerInvariant(),
            "capitalize" => Capitalize(str),
            "title" => Title(str),
            "string" => str,
            "replace" => Replace(str, Text(Arg(args, 0, "old", null), at, "replace"), Text(Arg(args, 1, "new", null), at, "replace"), Arg(args, 2, "count", null)),
            _ => throw Fail(at, $"unsupported filter '{name}'"),
        };
    }

    static string Capitalize(string s) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();

    static string Title(string s)
    {
        var text = new StringBuilder(s.Length);
        bool start = true;
        foreach (char c in s)
        {
            text.Append(start ? char.ToUpperInvariant(c) : char.ToLowerInvariant(c));
            start = !char.IsLetterOrDigit(c);
        }
        return text.ToString();
    }

    static string Replace(string s, string old, string replacement, object? count)
    {
        if (count is not long n || n < 0) return old.Length == 0 ? s : s.Replace(old, replacement, StringComparison.Ordinal);
        var text = new StringBuilder();
        int from = 0;
        for (long done = 0; done < n && old.Length > 0; done++)
        {
            int k = s.IndexOf(old, from, StringComparison.Ordinal);
            if (k < 0) break;
            text.Append(s, from, k - from).Append(replacement);
            from = k + old.Length;
        }
        return text.Append(s, from, s.Length - from).ToString();
    }

    // ---- Tests ----

    public static bool Test(string name, object? v, (List<object?> Positional, Dictionary<string, object?> Named) args, Position at) => name switch
    {
        "defined" => v is not Undefined,
        "undefined" => v is Undefined,
        "none" => v is null,
        "string" => v is string,
        "number" => v is long or double,
        "integer" => v is long,
        "float" => v is double,
        "boolean" => v is bool,
        "true" => v is true,
        "false" => v is false,
        "mapping" => v is OrderedDictionary<string, object?>,
        "iterable" => v is string or List<object?> or OrderedDictionary<string, object?>,
        "sequence" => v is string or List<object?> or OrderedDictionary<string, object?>,
        "even" => v is long n ? n % 2 == 0 : throw Fail(at, $"'even' needs an integer, got {TemplateValues.TypeName(v)}"),
        "odd" => v is long m ? m % 2 != 0 : throw Fail(at, $"'odd' needs an integer, got {TemplateValues.TypeName(v)}"),
        _ => TemplateValues.Equal(v, Arg(args, 0, "value", new Undefined("value"))), // equalto, eq
    };

    // ---- Global functions ----

    public static object? Call(string name, (List<object?> Positional, Dictionary<string, object?> Named) args, Position at)
    {
        switch (name)
        {
            case "raise_exception":
                throw new TemplateRuntimeException(TemplateValues.Str(Arg(args, 0, "message", "the chat template raised an exception")));
            case "namespace" or "dict":
                var values = new OrderedDictionary<string, object?>();
                foreach (var p in args.Positional)
                {
                    if (p is not OrderedDictionary<string, object?> m) throw Fail(at, $"{name}() takes a mapping or name=value arguments");
                    foreach (var (k, v) in m) values[k] = v;
                }
                foreach (var (k, v) in args.Named) values[k] = v;
                if (name == "dict") return values;
                var ns = new Namespace();
                foreach (var (k, v) in values) ns.Attributes[k] = v;
                return ns;
            case "range":
                var bounds = args.Positional.Select(p => p is long n ? n : throw Fail(at, "range() takes integers")).ToArray();
                var (start, stop, step) = bounds.Length switch
                {
                    1 => (0L, bounds[0], 1L),
                    2 => (bounds[0], bounds[1], 1L),
                    3 => (bounds[0], bounds[1], bounds[2]),
                    _ => throw Fail(at, "range() takes 1 to 3 integers"),
                };
                if (step == 0) throw Fail(at, "range() step cannot be zero");
                var range = new List<object?>();
                for (long i = start; step > 0 ? i < stop : i > stop; i += step) range.Add(i);
                return range;
            default: // strftime_now, as transformers defines it: the local time now
                return Strftime(DateTime.Now, Text(Arg(args, 0, "format", null), at, "strftime_now"));
        }
    }

    static string Strftime(DateTime t, string format)
    {
        var text = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 == format.Length) { text.Append(format[i]); continue; }
            char c = format[++i];
            text.Append(c switch
            {
                'd' => t.ToString("dd", CultureInfo.InvariantCulture),
                'm' => t.ToString("MM", CultureInfo.InvariantCulture),
                'Y' => t.ToString("yyyy", CultureInfo.InvariantCulture),
                'y' => t.ToString("yy", CultureInfo.InvariantCulture),
                'b' => t.ToString("MMM", CultureInfo.InvariantCulture),
                'B' => t.ToString("MMMM", CultureInfo.InvariantCulture),
                'a' => t.ToString("ddd", CultureInfo.InvariantCulture),
                'A' => t.ToString("dddd", CultureInfo.InvariantCulture),
                'H' => t.ToString("HH", CultureInfo.InvariantCulture),
                'M' => t.ToString("mm", CultureInfo.InvariantCulture),
                'S' => t.ToString("ss", CultureInfo.InvariantCulture),
                '%' => "%",
                _ => "%" + c,
            });
        }
        return text.ToString();
    }

    // ---- Methods of strings and mappings ----

    public static object? Method(string name, object? target, (List<object?> Positional, Dictionary<string, object?> Named) args, Position at)
    {
        if (target is OrderedDictionary<string, object?> m)
            return name switch
            {
                "items" => m.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList(),
                "keys" => m.Keys.Cast<object?>().ToList(),
                "values" => m.Values.ToList(),
                "get" => Arg(args, 0, "key", null) is string k && m.TryGetValue(k, out var v) ? v : Arg(args, 1, "default", null),
                _ => throw Fail(at, $"a mapping has no method '{name}'"),
            };
        if (target is not string s)
            throw Fail(at, target is Undefined u ? $"'{u.Name}' is undefined, so it has no method '{name}'" : $"{TemplateValues.TypeName(target)} has no method '{name}'");
        object? a0 = Arg(args, 0, "", null);
        char[]? chars = a0 is string cs ? cs.ToCharArray() : null;
        return name switch
        {
            "strip" => chars is null ? s.Trim() : s.Trim(chars),
            "lstrip" => chars is null ? s.TrimStart() : s.TrimStart(chars),
            "rstrip" => chars is null ? s.TrimEnd() : s.TrimEnd(chars),
            "split" => Split(s, a0 as string, Arg(args, 1, "maxsplit", -1L) is long max ? max : -1, at),
            "startswith" => Affix(a0, at).Any(p => s.StartsWith(p, StringComparison.Ordinal)),
            "endswith" => Affix(a0, at).Any(p => s.EndsWith(p, StringComparison.Ordinal)),
            "upper" => s.ToUpperInvariant(),
            "lower" => s.ToLowerInvariant(),
            "title" => Title(s),
            "capitalize" => Capitalize(s),
            "replace" => Replace(s, Text(a0, at, "replace"), Text(Arg(args, 1, "", null), at, "replace"), Arg(args, 2, "count", null)),
            "find" => (long)s.IndexOf(Text(a0, at, "find"), StringComparison.Ordinal),
            _ => throw Fail(at, $"a string has no method '{name}'"),
        };
    }

    static IEnumerable<string> Affix(object? v, Position at) => v switch
    {
        string s => [s],
        List<object?> l => l.Select(x => Text(x, at, "startswith/endswith")),
        _ => throw Fail(at, $"startswith/endswith needs a string or a tuple of strings, got {TemplateValues.TypeName(v)}"),
    };

    // Python's str.split: no separator splits on runs of whitespace and drops empty parts.
    static List<object?> Split(string s, string? sep, long max, Position at)
    {
        if (sep is "") throw Fail(at, "split() separator cannot be empty");
        var parts = new List<object?>();
        if (sep is null)
        {
            int i = 0;
            while (true)
            {
                while (i < s.Length && char.IsWhiteSpace(s[i])) i++;
                if (i == s.Length) break;
                if (max >= 0 && parts.Count == max) { parts.Add(s[i..].TrimEnd()); break; }
                int start = i;
                while (i < s.Length && !char.IsWhiteSpace(s[i])) i++;
                parts.Add(s[start..i]);
            }
            return parts;
        }
        int from = 0;
        while (max < 0 || parts.Count < max)
        {
            int k = s.IndexOf(sep, from, StringComparison.Ordinal);
            if (k < 0) break;
            parts.Add(s[from..k]);
            from = k + sep.Length;
        }
        parts.Add(s[from..]);
        return parts;
    }
}
