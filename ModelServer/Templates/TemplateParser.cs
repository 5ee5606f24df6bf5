// Parses lexed segments into statements and expressions with Jinja's precedence. Anything outside the supported subset
// (an unknown statement, filter, test, function or method) is refused here, at load, naming where it is.
namespace DeepSeekCluster.ModelServer.Templates;

public sealed class TemplateParser
{
    static readonly HashSet<string> Unsupported = ["macro", "call", "filter", "include", "import", "from", "extends", "block", "with", "autoescape", "do", "trans"];
    const string Supported = "this server runs for, if/elif/else, set, break, continue, raw and generation";

    readonly List<Segment> segments;
    readonly string source;
    int next;
    int loops;
    IReadOnlyList<Token> tokens = [];
    int ti;
    Segment current = null!;

    TemplateParser(List<Segment> segments, string source) { this.segments = segments; this.source = source; }

    /// <summary>The template's statements; throws <see cref="TemplateSyntaxException"/> naming <paramref name="source"/>.</summary>
    public static IReadOnlyList<Node> Parse(string text, string source)
    {
        var parser = new TemplateParser(TemplateLexer.Lex(text, source), source);
        return parser.Body([], out _, null);
    }

    TemplateSyntaxException Error(Position at, string message) => new(source, at.Line, at.Column, message);

    // ---- Statements ----

    List<Node> Body(string[] enders, out string ender, (string Name, Position At)? opened)
    {
        var nodes = new List<Node>();
        while (next < segments.Count)
        {
            var s = segments[next++];
            if (s.Kind == SegmentKind.Text) { nodes.Add(new TextNode(s.Text, s.At)); continue; }
            Begin(s);
            if (s.Kind == SegmentKind.Output)
            {
                var value = Expression();
                ExpectEnd("'}}'");
                nodes.Add(new OutputNode(value, s.At));
                continue;
            }
            var keyword = Take();
            if (keyword.Kind != TokenKind.Name) throw Error(keyword.At, $"a statement starts with a keyword, not '{keyword.Text}'");
            if (enders.Contains(keyword.Text)) { ender = keyword.Text; return nodes; }
            switch (keyword.Text)
            {
                case "if": nodes.Add(If(s.At)); break;
                case "for": nodes.Add(For(s.At)); break;
                case "set": nodes.Add(Set(s.At)); break;
                case "break" or "continue":
                    if (loops == 0) throw Error(s.At, $"'{{% {keyword.Text} %}}' outside a for loop");
                    ExpectEnd("'%}'");
                    nodes.Add(keyword.Text == "break" ? new BreakNode(s.At) : new ContinueNode(s.At));
                    break;
                case "generation": // transformers' marker of the assistant's tokens: its body renders as it is
                    ExpectEnd("'%}'");
                    nodes.AddRange(Body(["endgeneration"], out _, ("generation", s.At)));
                    ExpectEnd("'%}'");
                    break;
                case var kw when Unsupported.Contains(kw): throw Error(s.At, $"unsupported statement '{{% {kw} %}}': {Supported}");
                case var kw when kw is "elif" or "else" or "endif" or "endfor" or "endset" or "endgeneration" or "endraw":
                    throw Error(s.At, $"'{{% {kw} %}}' without the statement it closes");
                case var kw: throw Error(s.At, $"unknown statement '{{% {kw} %}}': {Supported}");
            }
        }
        if (opened is { } o) throw Error(o.At, $"'{{% {o.Name} %}}' is never closed with '{{% {enders[^1]} %}}'");
        ender = "";
        return nodes;
    }

    IfNode If(Position at)
    {
        var branches = new List<(Expr, IReadOnlyList<Node>)>();
        var test = Expression();
        while (true)
        {
            ExpectEnd("'%}'");
            var body = Body(["elif", "else", "endif"], out var ender, ("if", at));
            branches.Add((test, body));
            if (ender == "elif") { test = Expression(); continue; }
            ExpectEnd("'%}'");
            if (ender == "endif") return new IfNode(branches, [], at);
            var otherwise = Body(["endif"], out _, ("if", at));
            ExpectEnd("'%}'");
            return new IfNode(branches, otherwise, at);
        }
    }

    ForNode For(Position at)
    {
        var targets = new List<string> { TakeName("a loop variable") };
        while (TryOp(",")) targets.Add(TakeName("a loop variable"));
        if (!TryName("in")) throw Error(PeekAt, "expected 'in' after the loop variables");
        var items = Expression(conditional: false);
        Expr? filter = TryName("if") ? Expression(conditional: false) : null;
        if (Peek is { } t && t.IsName("recursive")) throw Error(t.At, $"unsupported: recursive loops; {Supported}");
        ExpectEnd("'%}'");
        loops++;
        var body = Body(["else", "endfor"], out var ender, ("for", at));
        loops--;
        List<Node> otherwise = [];
        ExpectEnd("'%}'");
        if (ender == "else")
        {
            otherwise = Body(["endfor"], out _, ("for", at));
            ExpectEnd("'%}'");
        }
        return new ForNode(targets, items, filter, body, otherwise, at);
    }

    SetNode Set(Position at)
    {
        var targets = new List<string> { TakeName("a variable to set") };
        string? attribute = null;
        if (TryOp(".")) attribute = TakeName("an attribute to set");
        else while (TryOp(",")) targets.Add(TakeName("a variable to set"));
        if (TryOp("="))
        {
            var value = Expression();
            if (Peek is { } comma && comma.Is(","))
            {
                var items = new List<Expr> { value };
                while (TryOp(",")) items.Add(Expression());
                value = new ListExpr(items, value.At);
            }
            ExpectEnd("'%}'");
            return new SetNode(targets, attribute, value, null, at);
        }
        if (attribute is not null || targets.Count > 1) throw Error(PeekAt, "expected '=' in this set statement");
        ExpectEnd("'%}'");
        var body = Body(["endset"], out _, ("set", at));
        ExpectEnd("'%}'");
        return new SetNode(targets, null, null, body, at);
    }

    // ---- The tokens inside one tag ----

    void Begin(Segment s) { current = s; tokens = s.Tokens; ti = 0; }
    Token? Peek => ti < tokens.Count ? tokens[ti] : null;
    Token? PeekSecond => ti + 1 < tokens.Count ? tokens[ti + 1] : null;
    Position PeekAt => Peek?.At ?? current.At;
    Token Take() => ti < tokens.Count ? tokens[ti++] : throw Error(current.At, "the tag ends where more was expected");
    bool TryOp(string op) { if (Peek is { } t && t.Is(op)) { ti++; return true; } return false; }
    bool TryName(string name) { if (Peek is { } t && t.IsName(name)) { ti++; return true; } return false; }

    void Expect(string op)
    {
        if (!TryOp(op)) throw Error(PeekAt, $"expected '{op}'" + (Peek is { } t ? $", found '{Describe(t)}'" : " before the end of the tag"));
    }

    void ExpectEnd(string closer)
    {
        if (Peek is { } t) throw Error(t.At, $"expected {closer}, found '{Describe(t)}'");
    }

    string TakeName(string what)
    {
        var t = Take();
        return t.Kind == TokenKind.Name ? t.Text : throw Error(t.At, $"expected {what}, found '{Describe(t)}'");
    }

    static string Describe(Token t) => t.Kind == TokenKind.String ? $"'{t.Value}'" : t.Text;

    // ---- Expressions, lowest precedence first (Jinja's parser order) ----

    Expr Expression(bool conditional = true)
    {
        var e = Or();
        while (conditional && TryName("if"))
        {
            var test = Or();
            e = new CondExpr(test, e, TryName("else") ? Expression() : null, e.At);
        }
        return e;
    }

    Expr Or() { var e = And(); while (TryName("or")) e = new BinaryExpr("or", e, And(), e.At); return e; }
    Expr And() { var e = Not(); while (TryName("and")) e = new BinaryExpr("and", e, Not(), e.At); return e; }
    Expr Not() => Peek is { } t && t.IsName("not") ? new UnaryExpr("not", SkipThen(Not), t.At) : Compare();

    Expr SkipThen(Func<Expr> parse) { ti++; return parse(); }

    Expr Compare()
    {
        var first = Sum();
        var rest = new List<(string, Expr)>();
        while (Peek is { } t)
        {
            if (t.Kind == TokenKind.Operator && t.Text is "==" or "!=" or "<" or ">" or "<=" or ">=") { ti++; rest.Add((t.Text, Sum())); }
            else if (t.IsName("in")) { ti++; rest.Add(("in", Sum())); }
            else if (t.IsName("not") && PeekSecond is { } n && n.IsName("in")) { ti += 2; rest.Add(("not in", Sum())); }
            else break;
        }
        return rest.Count == 0 ? first : new CompareExpr(first, rest, first.At);
    }

    Expr Sum() { var e = Concat(); while (Peek is { } t && (t.Is("+") || t.Is("-"))) { ti++; e = new BinaryExpr(t.Text, e, Concat(), t.At); } return e; }
    Expr Concat() { var e = Product(); while (Peek is { } t && t.Is("~")) { ti++; e = new BinaryExpr("~", e, Product(), t.At); } return e; }

    Expr Product()
    {
        var e = Power();
        while (Peek is { } t && t.Kind == TokenKind.Operator && t.Text is "*" or "/" or "//" or "%") { ti++; e = new BinaryExpr(t.Text, e, Power(), t.At); }
        return e;
    }

    Expr Power() { var e = Unary(true); while (Peek is { } t && t.Is("**")) { ti++; e = new BinaryExpr("**", e, Unary(true), t.At); } return e; }

    Expr Unary(bool withFilters)
    {
        Expr e;
        if (Peek is { } t && (t.Is("-") || t.Is("+"))) { ti++; e = new UnaryExpr(t.Text, Unary(false), t.At); }
        else e = Postfix(Primary());
        return withFilters ? FiltersAndTests(e) : e;
    }

    Expr FiltersAndTests(Expr e)
    {
        while (Peek is { } t)
        {
            if (t.Is("|"))
            {
                ti++;
                var name = Take();
                if (name.Kind != TokenKind.Name || !TemplateBuiltins.Filters.Contains(name.Text))
                    throw Error(name.At, $"unsupported filter '{Describe(name)}': supported are {string.Join(", ", TemplateBuiltins.Filters.Order())}");
                e = new FilterExpr(e, name.Text, Peek is { } p && p.Is("(") ? Args() : Arguments.None, name.At);
            }
            else if (t.IsName("is"))
            {
                ti++;
                bool negated = TryName("not");
                var name = Take();
                if (name.Kind != TokenKind.Name || !TemplateBuiltins.Tests.Contains(name.Text))
                    throw Error(name.At, $"unsupported test 'is {Describe(name)}': supported are {string.Join(", ", TemplateBuiltins.Tests.Order())}");
                Arguments args = Arguments.None;
                if (Peek is { } p && p.Is("(")) args = Args();
                else if (Peek is { } a && (a.Kind is TokenKind.String or TokenKind.Integer or TokenKind.Float || a.Is("[") || a.Is("{")
                    || (a.Kind == TokenKind.Name && a.Text is not ("else" or "or" or "and" or "if"))))
                    args = new Arguments([Postfix(Primary())], []);
                e = new TestExpr(e, name.Text, negated, args, name.At);
            }
            else break;
        }
        return e;
    }

    Expr Primary()
    {
        var t = Take();
        switch (t.Kind)
        {
            case TokenKind.String:
                string s = (string)t.Value!;
                while (Peek is { Kind: TokenKind.String } more) { ti++; s += (string)more.Value!; }
                return new LiteralExpr(s, t.At);
            case TokenKind.Integer or TokenKind.Float: return new LiteralExpr(t.Value, t.At);
            case TokenKind.Name:
                switch (t.Text)
                {
                    case "true" or "True": return new LiteralExpr(true, t.At);
                    case "false" or "False": return new LiteralExpr(false, t.At);
                    case "none" or "None": return new LiteralExpr(null, t.At);
                }
                if (Peek is not { } call || !call.Is("(")) return new NameExpr(t.Text, t.At);
                if (!TemplateBuiltins.Functions.Contains(t.Text))
                    throw Error(t.At, $"unsupported function '{t.Text}(…)': supported are {string.Join(", ", TemplateBuiltins.Functions.Order())}");
                return new CallExpr(t.Text, Args(), t.At);
        }
        if (t.Is("("))
        {
            if (TryOp(")")) return new ListExpr([], t.At);
            var e = Expression();
            if (Peek is { } comma && comma.Is(","))
            {
                var items = new List<Expr> { e };
                while (TryOp(",") && !(Peek is { } close && close.Is(")"))) items.Add(Expression());
                e = new ListExpr(items, t.At);
            }
            Expect(")");
            return e;
        }
        if (t.Is("["))
        {
            var items = new List<Expr>();
            while (!TryOp("]")) { if (items.Count > 0) { Expect(","); if (TryOp("]")) break; } items.Add(Expression()); }
            return new ListExpr(items, t.At);
        }
        if (t.Is("{"))
        {
            var items = new List<(Expr, Expr)>();
            while (!TryOp("}"))
            {
                if (items.Count > 0) { Expect(","); if (TryOp("}")) break; }
                var key = Expression();
                Expect(":");
                items.Add((key, Expression()));
            }
            return new DictExpr(items, t.At);
        }
        throw Error(t.At, $"unexpected '{Describe(t)}' where a value was expected");
    }

    Expr Postfix(Expr e)
    {
        while (Peek is { } t)
        {
            if (t.Is("."))
            {
                ti++;
                var name = Take();
                if (name.Kind != TokenKind.Name) throw Error(name.At, $"expected an attribute name after '.', found '{Describe(name)}'");
                if (Peek is { } p && p.Is("("))
                {
                    if (!TemplateBuiltins.Methods.Contains(name.Text))
                        throw Error(name.At, $"unsupported method '.{name.Text}(…)': supported are {string.Join(", ", TemplateBuiltins.Methods.Order())}");
                    e = new MethodExpr(e, name.Text, Args(), name.At);
                }
                else e = new AttrExpr(e, name.Text, name.At);
            }
            else if (t.Is("[")) { ti++; e = Subscript(e, t.At); }
            else if (t.Is("(")) throw Error(t.At, "only the global functions and string/mapping methods can be called");
            else break;
        }
        return e;
    }

    Expr Subscript(Expr target, Position at)
    {
        Expr? start = Peek is { } p && p.Is(":") ? null : Expression();
        if (TryOp("]")) return new ItemExpr(target, start!, at);
        Expect(":");
        Expr? stop = Peek is { } q && (q.Is(":") || q.Is("]")) ? null : Expression();
        Expr? step = null;
        if (TryOp(":") && !(Peek is { } r && r.Is("]"))) step = Expression();
        Expect("]");
        return new SliceExpr(target, start, stop, step, at);
    }

    Arguments Args()
    {
        Expect("(");
        var positional = new List<Expr>();
        var named = new List<(string, Expr)>();
        while (!TryOp(")"))
        {
            if (positional.Count + named.Count > 0) { Expect(","); if (TryOp(")")) break; }
            if (Peek is { Kind: TokenKind.Name } n && PeekSecond is { } eq && eq.Is("=")) { ti += 2; named.Add((n.Text, Expression())); }
            else if (named.Count > 0) throw Error(PeekAt, "a positional argument after a named one");
            else positional.Add(Expression());
        }
        return new Arguments(positional, named);
    }
}
