// Runs a parsed template: statements append to the output, expressions evaluate with Jinja's (Python's) semantics.
// A for loop's body has its own scope per iteration (a `set` inside it does not leak out; namespace() is the way out).
using System.Text;

namespace DeepSeekCluster.ModelServer.Templates;

public sealed class TemplateRenderer
{
    enum Flow { Normal, Break, Continue }

    readonly List<Dictionary<string, object?>> scopes = [];

    TemplateRenderer(IReadOnlyDictionary<string, object?> variables) => scopes.Add(new Dictionary<string, object?>(variables));

    /// <summary>The template's output for these variables; <see cref="TemplateRuntimeException"/> when it refuses them.</summary>
    public static string Render(IReadOnlyList<Node> template, IReadOnlyDictionary<string, object?> variables)
    {
        var output = new StringBuilder();
        new TemplateRenderer(variables).Exec(template, output);
        return output.ToString();
    }

    // ---- Statements ----

    Flow Exec(IReadOnlyList<Node> nodes, StringBuilder output)
    {
        foreach (var node in nodes)
        {
            var flow = node switch
            {
                TextNode t => Append(output, t.Text),
                OutputNode o => Append(output, TemplateValues.Str(Eval(o.Value))),
                IfNode i => If(i, output),
                ForNode f => For(f, output),
                SetNode s => Set(s),
                BreakNode => Flow.Break,
                ContinueNode => Flow.Continue,
                _ => throw new InvalidOperationException($"unknown template node {node.GetType().Name}"),
            };
            if (flow != Flow.Normal) return flow;
        }
        return Flow.Normal;
    }

    static Flow Append(StringBuilder output, string text)
    {
        output.Append(text);
        return Flow.Normal;
    }

    Flow If(IfNode node, StringBuilder output)
    {
        foreach (var (test, body) in node.Branches)
            if (TemplateValues.Truthy(Eval(test))) return Exec(body, output);
        return Exec(node.Else, output);
    }

    Flow For(ForNode node, StringBuilder output)
    {
        var items = TemplateValues.Items(Eval(node.Items), node.Items.At);
        if (node.Filter is not null)
            items = items.Where(item => Scoped(() => { Bind(node.Targets, item, node.At); return TemplateValues.Truthy(Eval(node.Filter)); })).ToList();
        var loop = new LoopInfo(items);
        for (int i = 0; i < items.Count; i++)
        {
            loop.Index0 = i;
            var flow = Scoped(() =>
            {
                Bind(node.Targets, items[i], node.At);
                scopes[^1]["loop"] = loop;
                return Exec(node.Body, output);
            });
            if (flow == Flow.Break) break;
        }
        return items.Count == 0 ? Exec(node.Else, output) : Flow.Normal;
    }

    T Scoped<T>(Func<T> body)
    {
        scopes.Add([]);
        try { return body(); }
        finally { scopes.RemoveAt(scopes.Count - 1); }
    }

    void Bind(IReadOnlyList<string> targets, object? value, Position at)
    {
        if (targets.Count == 1) { scopes[^1][targets[0]] = value; return; }
        var parts = TemplateValues.Items(value, at);
        if (parts.Count != targets.Count)
            throw new TemplateRuntimeException($"{at}: cannot unpack {parts.Count} values into {targets.Count} names ({string.Join(", ", targets)})");
        for (int i = 0; i < targets.Count; i++) scopes[^1][targets[i]] = parts[i];
    }

    Flow Set(SetNode node)
    {
        object? value;
        if (node.Value is not null) value = Eval(node.Value);
        else
        {
            var captured = new StringBuilder();
            Exec(node.Body!, captured);
            value = captured.ToString();
        }
        if (node.Attribute is null) Bind(node.Targets, value, node.At);
        else if (Lookup(node.Targets[0]) is Namespace ns) ns.Attributes[node.Attribute] = value;
        else throw new TemplateRuntimeException($"{node.At}: '{node.Targets[0]}.{node.Attribute}' can be set only when '{node.Targets[0]}' is a namespace()");
        return Flow.Normal;
    }

    object? Lookup(string name)
    {
        for (int i = scopes.Count - 1; i >= 0; i--)
            if (scopes[i].TryGetValue(name, out var value)) return value;
        return new Undefined(name);
    }

    // ---- Expressions ----

    object? Eval(Expr e) => e switch
    {
        LiteralExpr l => l.Value,
        NameExpr n => Lookup(n.Name),
        ListExpr l => l.Items.Select(Eval).ToList(),
        DictExpr d => TemplateValues.ToDict(d.Items.Select(kv => (Eval(kv.Key) is string k ? k
            : throw new TemplateRuntimeException($"{kv.Key.At}: dictionary keys must be strings here"), Eval(kv.Value)))),
        AttrExpr a => Attribute(Eval(a.Target), a.Name, a.At),
        ItemExpr i => Item(Eval(i.Target), Eval(i.Index), i.At),
        SliceExpr s => Slice(Eval(s.Target), s),
        UnaryExpr u => Unary(u),
        BinaryExpr { Op: "and" } b => Eval(b.Left) is var l && !TemplateValues.Truthy(l) ? l : Eval(b.Right),
        BinaryExpr { Op: "or" } b => Eval(b.Left) is var l && TemplateValues.Truthy(l) ? l : Eval(b.Right),
        BinaryExpr b => TemplateBuiltins.Arithmetic(b.Op, Eval(b.Left), Eval(b.Right), b.At),
        CompareExpr c => Compare(c),
        CondExpr c => TemplateValues.Truthy(Eval(c.Test)) ? Eval(c.Then) : c.Else is null ? new Undefined("else") : Eval(c.Else),
        FilterExpr f => TemplateBuiltins.Filter(f.Name, Eval(f.Target), EvalArgs(f.Args), f.At),
        TestExpr t => TemplateBuiltins.Test(t.Name, Eval(t.Target), EvalArgs(t.Args), t.At) != t.Negated,
        CallExpr c => TemplateBuiltins.Call(c.Function, EvalArgs(c.Args), c.At),
        MethodExpr m => TemplateBuiltins.Method(m.Method, Eval(m.Target), EvalArgs(m.Args), m.At),
        _ => throw new InvalidOperationException($"unknown template expression {e.GetType().Name}"),
    };

    (List<object?> Positional, Dictionary<string, object?> Named) EvalArgs(Arguments args) =>
        (args.Positional.Select(Eval).ToList(), args.Named.ToDictionary(a => a.Name, a => Eval(a.Value)));

    object? Unary(UnaryExpr u)
    {
        var v = Eval(u.Operand);
        return u.Op switch
        {
            "not" => !TemplateValues.Truthy(v),
            "-" => v switch
            {
                long n => (object)(-n),
                double d => -d,
                bool b => b ? -1L : 0L,
                _ => throw new TemplateRuntimeException($"{u.At}: cannot negate {TemplateValues.TypeName(v)}"),
            },
            _ => TemplateValues.IsNumber(v) ? v : throw new TemplateRuntimeException($"{u.At}: unary '+' needs a number, got {TemplateValues.TypeName(v)}"),
        };
    }

    bool Compare(CompareExpr c)
    {
        var left = Eval(c.First);
        foreach (var (op, rightExpr) in c.Rest)
        {
            var right = Eval(rightExpr);
            bool holds = op switch
            {
                "==" => TemplateValues.Equal(left, right),
                "!=" => !TemplateValues.Equal(left, right),
                "in" => TemplateValues.Contains(right, left, rightExpr.At),
                "not in" => !TemplateValues.Contains(right, left, rightExpr.At),
                "<" => TemplateValues.Order(left, right, rightExpr.At) < 0,
                ">" => TemplateValues.Order(left, right, rightExpr.At) > 0,
                "<=" => TemplateValues.Order(left, right, rightExpr.At) <= 0,
                _ => TemplateValues.Order(left, right, rightExpr.At) >= 0,
            };
            if (!holds) return false;
            left = right;
        }
        return true;
    }

    // Jinja's getattr: a mapping's key, a namespace's attribute, loop's fields; a missing one is Undefined.
    static object? Attribute(object? target, string name, Position at) => target switch
    {
        Undefined u => throw new TemplateRuntimeException($"{at}: '{u.Name}' is undefined, so it has no attribute '{name}'"),
        OrderedDictionary<string, object?> m => m.TryGetValue(name, out var v) ? v : new Undefined(name),
        Namespace ns => ns.Attributes.TryGetValue(name, out var v) ? v : new Undefined(name),
        LoopInfo loop => loop.Get(name),
        _ => new Undefined(name),
    };

    static object? Item(object? target, object? index, Position at)
    {
        switch (target, index)
        {
            case (Undefined u, _): throw new TemplateRuntimeException($"{at}: '{u.Name}' is undefined, so it cannot be indexed");
            case (OrderedDictionary<string, object?> m, string key): return m.TryGetValue(key, out var v) ? v : new Undefined(key);
            case (List<object?> l, long i): return i >= -l.Count && i < l.Count ? l[(int)(i < 0 ? i + l.Count : i)] : new Undefined($"[{i}]");
            case (string s, long i):
                var runes = s.EnumerateRunes().ToList();
                return i >= -runes.Count && i < runes.Count ? runes[(int)(i < 0 ? i + runes.Count : i)].ToString() : new Undefined($"[{i}]");
            case (_, string name): return Attribute(target, name, at);
            default: return new Undefined($"[{TemplateValues.Repr(index)}]");
        }
    }

    object? Slice(object? target, SliceExpr s)
    {
        long? Bound(Expr? e) => e is null ? null : Eval(e) switch
        {
            null => null,
            long n => n,
            var v => throw new TemplateRuntimeException($"{e.At}: slice bounds must be integers, got {TemplateValues.TypeName(v)}"),
        };
        long? start = Bound(s.Start), stop = Bound(s.Stop), step = Bound(s.Step);
        if (step == 0) throw new TemplateRuntimeException($"{s.At}: slice step cannot be zero");
        List<object?> items = target switch
        {
            List<object?> l => l,
            string str => str.EnumerateRunes().Select(r => (object?)r.ToString()).ToList(),
            Undefined u => throw new TemplateRuntimeException($"{s.At}: '{u.Name}' is undefined, so it cannot be sliced"),
            _ => throw new TemplateRuntimeException($"{s.At}: {TemplateValues.TypeName(target)} cannot be sliced"),
        };
        var picked = PythonSlice(items, start, stop, step ?? 1);
        return target is string ? string.Concat(picked.Cast<string>()) : picked;
    }

    static List<object?> PythonSlice(List<object?> items, long? start, long? stop, long step)
    {
        long n = items.Count;
        long Clamp(long? v, long low, long high, long whenNull)
        {
            if (v is not long x) return whenNull;
            if (x < 0) x += n;
            return Math.Clamp(x, low, high);
        }
        var picked = new List<object?>();
        if (step > 0)
            for (long i = Clamp(start, 0, n, 0), end = Clamp(stop, 0, n, n); i < end; i += step) picked.Add(items[(int)i]);
        else
            for (long i = Clamp(start, -1, n - 1, n - 1), end = Clamp(stop, -1, n - 1, -1); i > end; i += step) picked.Add(items[(int)i]);
        return picked;
    }
}
