// The parsed template: statements (what is output, in order) and expressions; every node keeps its position for messages.
namespace DeepSeekCluster.ModelServer.Templates;

public abstract record Node(Position At);

// ---- Statements ----

public sealed record TextNode(string Text, Position At) : Node(At);
public sealed record OutputNode(Expr Value, Position At) : Node(At);
public sealed record IfNode(IReadOnlyList<(Expr Test, IReadOnlyList<Node> Body)> Branches, IReadOnlyList<Node> Else, Position At) : Node(At);
public sealed record ForNode(IReadOnlyList<string> Targets, Expr Items, Expr? Filter, IReadOnlyList<Node> Body, IReadOnlyList<Node> Else, Position At) : Node(At);
/// <summary>{% set a = … %}, {% set a, b = … %}, {% set ns.attr = … %} (Attribute set), or a block set (Value null, Body set).</summary>
public sealed record SetNode(IReadOnlyList<string> Targets, string? Attribute, Expr? Value, IReadOnlyList<Node>? Body, Position At) : Node(At);
public sealed record BreakNode(Position At) : Node(At);
public sealed record ContinueNode(Position At) : Node(At);

// ---- Expressions ----

public abstract record Expr(Position At) : Node(At);
public sealed record LiteralExpr(object? Value, Position At) : Expr(At);
public sealed record NameExpr(string Name, Position At) : Expr(At);
public sealed record ListExpr(IReadOnlyList<Expr> Items, Position At) : Expr(At);
public sealed record DictExpr(IReadOnlyList<(Expr Key, Expr Value)> Items, Position At) : Expr(At);
public sealed record AttrExpr(Expr Target, string Name, Position At) : Expr(At);
public sealed record ItemExpr(Expr Target, Expr Index, Position At) : Expr(At);
public sealed record SliceExpr(Expr Target, Expr? Start, Expr? Stop, Expr? Step, Position At) : Expr(At);
public sealed record UnaryExpr(string Op, Expr Operand, Position At) : Expr(At);
/// <summary>Arithmetic, `~`, and the short-circuit `and` / `or`.</summary>
public sealed record BinaryExpr(string Op, Expr Left, Expr Right, Position At) : Expr(At);
/// <summary>A chain a == b &lt; c …, each operator one of ==, !=, &lt;, &gt;, &lt;=, &gt;=, in, not in.</summary>
public sealed record CompareExpr(Expr First, IReadOnlyList<(string Op, Expr Right)> Rest, Position At) : Expr(At);
public sealed record CondExpr(Expr Test, Expr Then, Expr? Else, Position At) : Expr(At);
public sealed record Arguments(IReadOnlyList<Expr> Positional, IReadOnlyList<(string Name, Expr Value)> Named)
{
    public static readonly Arguments None = new([], []);
}
public sealed record FilterExpr(Expr Target, string Name, Arguments Args, Position At) : Expr(At);
public sealed record TestExpr(Expr Target, string Name, bool Negated, Arguments Args, Position At) : Expr(At);
/// <summary>A global function: raise_exception, namespace, range, dict, strftime_now.</summary>
public sealed record CallExpr(string Function, Arguments Args, Position At) : Expr(At);
/// <summary>A method of a string or mapping: content.split('x'), message.get('k'), …</summary>
public sealed record MethodExpr(Expr Target, string Method, Arguments Args, Position At) : Expr(At);
