// Values as a template sees them, with Python's semantics where Jinja borrows them: null is None, long/double are
// int/float, List<object?> a list, OrderedDictionary<string, object?> a dict; plus Undefined, namespace() and `loop`.
using System.Globalization;
using System.Text;
using System.Text.Json;

namespace DeepSeekCluster.ModelServer.Templates;

/// <summary>A name or key that does not exist: renders empty, is false, iterates as nothing; using it further is an error.</summary>
public sealed class Undefined(string name)
{
    public string Name { get; } = name;
}

/// <summary>namespace(…): the one object whose attributes a template may set, so a loop can carry state out.</summary>
public sealed class Namespace
{
    public OrderedDictionary<string, object?> Attributes { get; } = [];
}

/// <summary>The `loop` variable of a for loop.</summary>
public sealed class LoopInfo(IReadOnlyList<object?> items)
{
    public int Index0 { get; set; }

    public object? Get(string name) => name switch
    {
        "index0" => (long)Index0,
        "index" => (long)Index0 + 1,
        "first" => Index0 == 0,
        "last" => Index0 == items.Count - 1,
        "length" => (long)items.Count,
        "revindex" => (long)(items.Count - Index0),
        "revindex0" => (long)(items.Count - Index0 - 1),
        "previtem" => Index0 > 0 ? items[Index0 - 1] : new Undefined("loop.previtem"),
        "nextitem" => Index0 + 1 < items.Count ? items[Index0 + 1] : new Undefined("loop.nextitem"),
        _ => new Undefined("loop." + name),
    };
}

public static class TemplateValues
{
    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long n => n != 0,
        double d => d != 0,
        string s => s.Length > 0,
        List<object?> l => l.Count > 0,
        OrderedDictionary<string, object?> m => m.Count > 0,
        _ => true,
    };

    /// <summary>Python's str(): what {{ value }} outputs (Undefined outputs nothing).</summary>
    public static string Str(object? v) => v switch
    {
        string s => s,
        Undefined => "",
        _ => Repr(v),
    };

    public static string Repr(object? v) => v switch
    {
        null => "None",
        bool b => b ? "True" : "False",
        long n => n.ToString(CultureInfo.InvariantCulture),
        double d => FloatRepr(d),
        string s => "'" + s.Replace("\\", "\\\\").Replace("'", "\\'").Replace("\n", "\\n") + "'",
        List<object?> l => "[" + string.Join(", ", l.Select(Repr)) + "]",
        OrderedDictionary<string, object?> m => "{" + string.Join(", ", m.Select(kv => Repr(kv.Key) + ": " + Repr(kv.Value))) + "}",
        Namespace => "<Namespace>",
        Undefined => "",
        _ => v.ToString() ?? "",
    };

    static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        string s = d.ToString("R", CultureInfo.InvariantCulture);
        return s.Contains('.') || s.Contains('E') ? s.Replace("E+", "e+").Replace("E-", "e-") : s + ".0";
    }

    public static bool IsNumber(object? v) => v is long or double or bool;

    static double Number(object? v) => v switch { long n => n, double d => d, bool b => b ? 1 : 0, _ => double.NaN };

    /// <summary>Python ==: numbers by value (True == 1), strings ordinal, lists and dicts element by element.</summary>
    public static bool Equal(object? a, object? b)
    {
        if (a is Undefined || b is Undefined) return a is Undefined && b is Undefined;
        if (IsNumber(a) && IsNumber(b)) return a is long x && b is long y ? x == y : Number(a) == Number(b);
        return (a, b) switch
        {
            (null, null) => true,
            (string x, string y) => x == y,
            (List<object?> x, List<object?> y) => x.Count == y.Count && x.Zip(y).All(p => Equal(p.First, p.Second)),
            (OrderedDictionary<string, object?> x, OrderedDictionary<string, object?> y) =>
                x.Count == y.Count && x.All(kv => y.TryGetValue(kv.Key, out var o) && Equal(kv.Value, o)),
            _ => ReferenceEquals(a, b),
        };
    }

    /// <summary>Python's ordering of two numbers or two strings; anything else is a type error.</summary>
    public static int Order(object? a, object? b, Position at)
    {
        if (IsNumber(a) && IsNumber(b)) return Number(a).CompareTo(Number(b));
        if (a is string x && b is string y) return string.CompareOrdinal(x, y);
        throw new TemplateRuntimeException($"{at}: cannot order {TypeName(a)} and {TypeName(b)}");
    }

    public static bool Contains(object? container, object? item, Position at) => container switch
    {
        string s when item is string sub => s.Contains(sub, StringComparison.Ordinal),
        string => throw new TemplateRuntimeException($"{at}: 'in <string>' needs a string on the left, got {TypeName(item)}"),
        List<object?> l => l.Any(x => Equal(x, item)),
        OrderedDictionary<string, object?> m => item is string k && m.ContainsKey(k),
        Undefined => false,
        _ => throw new TemplateRuntimeException($"{at}: {TypeName(container)} is not a container for 'in'"),
    };

    /// <summary>What a for loop walks: a list's items, a dict's keys, a string's characters; Undefined walks nothing.</summary>
    public static List<object?> Items(object? v, Position at) => v switch
    {
        List<object?> l => l,
        OrderedDictionary<string, object?> m => m.Keys.Cast<object?>().ToList(),
        string s => s.Select(c => (object?)c.ToString()).ToList(),
        Undefined => [],
        _ => throw new TemplateRuntimeException($"{at}: {TypeName(v)} is not iterable"),
    };

    public static string TypeName(object? v) => v switch
    {
        null => "None",
        bool => "bool",
        long => "int",
        double => "float",
        string => "str",
        List<object?> => "list",
        OrderedDictionary<string, object?> => "dict",
        Namespace => "namespace",
        LoopInfo => "loop",
        Undefined u => $"undefined ('{u.Name}')",
        _ => v.GetType().Name,
    };

    /// <summary>A request's JSON as template values (objects keep their key order, as Python's json does).</summary>
    public static object? FromJson(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.String => e.GetString(),
        JsonValueKind.Number => e.TryGetInt64(out var n) ? (object)n : e.GetDouble(),
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        JsonValueKind.Array => e.EnumerateArray().Select(FromJson).ToList(),
        JsonValueKind.Object => ToDict(e.EnumerateObject().Select(p => (p.Name, FromJson(p.Value)))),
        _ => null,
    };

    public static OrderedDictionary<string, object?> ToDict(IEnumerable<(string Key, object? Value)> pairs)
    {
        var d = new OrderedDictionary<string, object?>();
        foreach (var (k, v) in pairs) d[k] = v;
        return d;
    }

    /// <summary>transformers' tojson: json.dumps(ensure_ascii=False), Python's separators (", ", ": "), optional indent.</summary>
    public static string ToJson(object? v, int? indent, Position at)
    {
        var text = new StringBuilder();
        WriteJson(text, v, indent, 0, at);
        return text.ToString();
    }

    static void WriteJson(StringBuilder text, object? v, int? indent, int depth, Position at)
    {
        string Break(int d) => indent is int n ? "\n" + new string(' ', n * d) : "";
        string comma = indent is null ? ", " : ",";
        switch (v)
        {
            case null: text.Append("null"); break;
            case bool b: text.Append(b ? "true" : "false"); break;
            case long n: text.Append(n.ToString(CultureInfo.InvariantCulture)); break;
            case double d: text.Append(double.IsFinite(d) ? FloatRepr(d) : double.IsNaN(d) ? "NaN" : d > 0 ? "Infinity" : "-Infinity"); break;
            case string s: JsonString(text, s); break;
            case List<object?> l:
                if (l.Count == 0) { text.Append("[]"); break; }
                text.Append('[');
                for (int i = 0; i < l.Count; i++)
                {
                    if (i > 0) text.Append(comma);
                    text.Append(Break(depth + 1));
                    WriteJson(text, l[i], indent, depth + 1, at);
                }
                text.Append(Break(depth)).Append(']');
                break;
            case OrderedDictionary<string, object?> m:
                if (m.Count == 0) { text.Append("{}"); break; }
                text.Append('{');
                int k = 0;
                foreach (var (key, value) in m)
                {
                    if (k++ > 0) text.Append(comma);
                    text.Append(Break(depth + 1));
                    JsonString(text, key);
                    text.Append(": ");
                    WriteJson(text, value, indent, depth + 1, at);
                }
                text.Append(Break(depth)).Append('}');
                break;
            default: throw new TemplateRuntimeException($"{at}: {TypeName(v)} cannot be written as JSON");
        }
    }

    static void JsonString(StringBuilder text, string s)
    {
        text.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': text.Append("\\\""); break;
                case '\\': text.Append("\\\\"); break;
                case '\n': text.Append("\\n"); break;
                case '\r': text.Append("\\r"); break;
                case '\t': text.Append("\\t"); break;
                case '\b': text.Append("\\b"); break;
                case '\f': text.Append("\\f"); break;
                case < ' ': text.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture)); break;
                default: text.Append(c); break;
            }
        }
        text.Append('"');
    }
}
