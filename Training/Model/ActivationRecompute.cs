// Activation recompute: a piece of the forward run without keeping its graph, and run again inside backward. Not a
// scheduler (which layers to recompute is the mode's fixed choice), and not a memory planner (Parallel/MemoryPlan.cs).
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// none: every activation kept. full: per decoder layer (main and MTP blocks), only the layer's input is kept and the
/// layer's forward runs again in backward. selective: only the cheap parts are recomputed, as DeepSeek-V3 does: every
/// RMSNorm (its normalized product is not kept), the SwiGLU product silu(gate)·up of dense MLPs, experts and shared
/// experts (silu(gate) is not kept), and the MLA up-projections with their norms (q_a_layernorm→q_b_proj,
/// kv_a_layernorm→kv_b_proj: their norm products are not kept). Matmuls outside the up-projections, attention and
/// routing are never recomputed under selective.
/// </summary>
public enum RecomputeMode { None, Full, Selective }

/// <summary>
/// Parameters a module holds only while it runs (ZeRO-3, Parallel/ZeroParameters.cs): <paramref name="Gather"/> gives
/// them their whole values (every rank calls it at the same point: it is a collective), <paramref name="Release"/> frees them.
/// </summary>
public sealed record GatheredParameters(Action Gather, Action Release)
{
    /// <summary>The gather before the backward's rerun, when it differs from the forward's (it prefetches the layer before, not after).</summary>
    public Action? GatherForBackward { get; init; }

    /// <summary>Called once the backward has added the parameters' gradients into their <c>.grad</c>, before the release (a ZeRO-3 rank reduce-scatters them there).</summary>
    public Action? Differentiated { get; init; }
}

public static class ActivationRecompute
{
    /// <summary>The values <see cref="Parse"/> accepts, as the job spec and options spell them.</summary>
    public static readonly string[] Modes = ["none", "full", "selective"];

    public static RecomputeMode Parse(string mode) => mode switch
    {
        "none" => RecomputeMode.None,
        "full" => RecomputeMode.Full,
        "selective" => RecomputeMode.Selective,
        _ => throw new ArgumentException($"recompute must be one of {string.Join(", ", Modes)}, got '{mode}'"),
    };

    /// <summary>Sets every module of <paramref name="model"/> (a whole model, or one layer) to recompute as <paramref name="mode"/> says (in training, with gradients on).</summary>
    public static void Apply(TorchSharp.torch.nn.Module model, RecomputeMode mode)
    {
        foreach (var (_, module) in model.named_modules().Prepend((string.Empty, model)))
            switch (module)
            {
                case DecoderLayer layer: layer.RecomputeLayer = mode == RecomputeMode.Full; break;
                case RmsNorm norm: norm.RecomputeNorm = mode == RecomputeMode.Selective; break;
                case SwiGluMlp mlp: mlp.RecomputeProduct = mode == RecomputeMode.Selective; break;
                case MultiHeadLatentAttention mla: mla.RecomputeUpProjections = mode == RecomputeMode.Selective; break;
            }
    }

    static long recomputed;

    // The leaves a body creates while it runs again in backward (thread-static: the body runs on the backward's thread).
    [ThreadStatic] static List<Tensor>? leavesOfRerun;

    /// <summary>
    /// Declares <paramref name="leaf"/>, a leaf tensor a body creates for itself (expert parallelism's weights of another
    /// source's tokens, whose gradients must stay a separate term), so that when the body runs again in backward the leaf
    /// gets its gradient as it would without recompute; outside such a run, nothing.
    /// </summary>
    public static void DeclareLeaf(Tensor leaf) => leavesOfRerun?.Add(leaf);

    /// <summary>Segments run a second time in backward, since the process started (the tests check that recompute happened).</summary>
    public static long Recomputed => Interlocked.Read(ref recomputed);

    /// <summary>Whether a module asked to recompute does so now: only where a backward will follow.</summary>
    internal static bool Active(bool asked, bool training) => asked && training && is_grad_enabled();

    /// <summary>
    /// <paramref name="body"/>(<paramref name="inputs"/>) whose intermediate activations are not kept: backward keeps only
    /// the inputs, runs the body again with a graph and differentiates it. <paramref name="parameters"/>: every tensor the
    /// body reads besides its inputs that needs a gradient (they are the function's inputs too, so the graph reaches them);
    /// a leaf's gradient is added into its <c>.grad</c> by the backward itself, with the bits the autograd engine's
    /// accumulation gives, and not returned (docs/decisions.md: the micro-batch's scope would hold it), so the segment
    /// serves <c>backward()</c>, not <c>autograd.grad</c> over its parameters. The body must be deterministic (this model
    /// is RNG-free) and must return the same number of outputs every time.
    /// </summary>
    public static Tensor[] Run(Func<Tensor[], Tensor[]> body, Tensor[] inputs, IReadOnlyList<Tensor> parameters)
    {
        var segment = new Segment(body, inputs.Length, inputs.Select(t => t.requires_grad).ToArray(),
                                  parameters.Select(p => p.requires_grad).ToArray());
        var args = new object[1 + inputs.Length + parameters.Count];
        args[0] = segment;
        inputs.CopyTo(args, 1);
        for (int i = 0; i < parameters.Count; i++) args[1 + inputs.Length + i] = parameters[i];
        var outputs = RecomputedSegment.apply(args);
        FunctionOutputCache.Shrink(segment.Context);
        segment.Context = null;
        return outputs.ToArray();
    }

    /// <summary>
    /// <see cref="Run"/> for a body whose <paramref name="parameters"/> are gathered only while it runs (ZeRO-3): the
    /// forward gathers, runs the body without a graph and releases; the backward gathers again, reruns the body with a
    /// graph, differentiates it, adds the parameters' gradients into their <c>.grad</c> (as the autograd engine's
    /// accumulation would: the first one is stored, later ones added) and releases. The parameters are no inputs of the
    /// function, so nothing outside the segment ever sees them whole, and no gathered tensor outlives a run.
    /// </summary>
    public static Tensor[] RunGathered(Func<Tensor[], Tensor[]> body, Tensor[] inputs, IReadOnlyList<Tensor> parameters, GatheredParameters gathered)
    {
        var segment = new Segment(body, inputs.Length, inputs.Select(t => t.requires_grad).ToArray(), [])
        {
            Gathered = gathered, GatheredParameters = [.. parameters],
        };
        var args = new object[1 + inputs.Length];
        args[0] = segment;
        inputs.CopyTo(args, 1);
        var outputs = RecomputedSegment.apply(args);
        FunctionOutputCache.Shrink(segment.Context);
        segment.Context = null;
        return outputs.ToArray();
    }

    internal sealed class Segment(Func<Tensor[], Tensor[]> body, int inputs, bool[] inputNeedsGrad, bool[] parameterNeedsGrad)
    {
        public GatheredParameters? Gathered { get; init; }
        public Tensor[] GatheredParameters { get; init; } = [];
        public Func<Tensor[], Tensor[]> Body { get; } = body;
        public int Inputs { get; } = inputs;
        public bool[] InputNeedsGrad { get; } = inputNeedsGrad;
        public bool[] ParameterNeedsGrad { get; } = parameterNeedsGrad;
        public AutogradContext? Context { get; set; }
    }

    internal sealed class RecomputedSegment : MultiTensorFunction<RecomputedSegment>
    {
        public override string Name => nameof(RecomputedSegment);

        // Runs with autograd off (Function.apply turns it off): nothing inside is kept but the inputs saved here.
        public override List<Tensor> forward(AutogradContext ctx, params object[] vars)
        {
            var segment = (Segment)vars[0];
            segment.Context = ctx;
            var inputs = new Tensor[segment.Inputs];
            for (int i = 0; i < inputs.Length; i++) inputs[i] = (Tensor)vars[1 + i];
            ctx.save_for_backward([.. inputs]);
            ctx.save_data("segment", segment);
            ctx.save_data("parameters", vars.Skip(1 + segment.Inputs).Cast<Tensor>().ToArray());
            if (segment.Gathered is not { } gathered) return [.. segment.Body(inputs)];
            gathered.Gather();
            try { return [.. segment.Body(inputs)]; }
            finally { gathered.Release(); }
        }

        public override List<Tensor> backward(AutogradContext ctx, List<Tensor> gradOutputs)
        {
            var segment = (Segment)ctx.get_data("segment");
            var parameters = (Tensor[])ctx.get_data("parameters");
            using var scope = NewDisposeScope(); // backward may run on an engine thread (CUDA) with no scope of its own
            var saved = ctx.get_saved_variables();
            var inputs = new Tensor[segment.Inputs];
            for (int i = 0; i < inputs.Length; i++) inputs[i] = saved[i].detach().requires_grad_(segment.InputNeedsGrad[i]);
            Tensor[] outputs;
            var leaves = new List<Tensor>();
            var outer = leavesOfRerun;
            leavesOfRerun = leaves;
            if (segment.Gathered is { } toGather) (toGather.GatherForBackward ?? toGather.Gather)();
            List<Tensor?> grads;
            var gatheredParameters = segment.GatheredParameters.Where(p => p.requires_grad).ToArray();
            try
            {
                try
                {
                    using (enable_grad()) outputs = segment.Body(inputs);
                }
                finally { leavesOfRerun = outer; }
                Interlocked.Increment(ref recomputed);

                var wrt = new List<Tensor>();
                for (int i = 0; i < inputs.Length; i++) if (segment.InputNeedsGrad[i]) wrt.Add(inputs[i]);
                for (int i = 0; i < parameters.Length; i++) if (segment.ParameterNeedsGrad[i]) wrt.Add(parameters[i]);
                wrt.AddRange(leaves);
                wrt.AddRange(gatheredParameters);
                var differentiable = outputs.Select((o, i) => (o, g: gradOutputs[i])).Where(p => p.o.requires_grad).ToList();
                grads = differentiable.Count == 0 || wrt.Count == 0
                    ? wrt.Select(_ => (Tensor?)null).ToList()
                    : grad(differentiable.Select(p => p.o).ToList(), wrt, differentiable.Select(p => p.g).ToList(), allow_unused: true)
                        .Select(g => g is null || g.IsInvalid ? null : g).ToList();
                // The gathered parameters' gradients, while they are whole: the engine's accumulation, done here. They
                // stay in this backward's scope, freed when it ends: moved out, the caller's scope would hold a second
                // copy of each layer's gradients until its micro-batch ends, against ZeRO-3's per-layer freeing.
                int first = grads.Count - gatheredParameters.Length;
                for (int i = 0; i < gatheredParameters.Length; i++)
                    if (grads[first + i] is { } g) AccumulateGrad(gatheredParameters[i], g);
                segment.Gathered?.Differentiated?.Invoke();
            }
            finally { segment.Gathered?.Release(); }

            // One entry per argument of apply: none for the segment itself, then the inputs', then the parameters'. Only
            // what is returned leaves this backward's scope: libtorch copies each handle the engine is given, but the
            // wrapper still holds the storage until the caller's scope ends (its micro-batch) or, with no scope (a CUDA
            // engine thread), until a collection. So a leaf parameter's gradient is not returned but added into its .grad
            // here, as the engine would, and freed with this scope: returned, the micro-batch would hold a second copy of
            // every rerun layer's gradients beside the .grads. The .grad is complete when this returns, before any node
            // the forward created earlier runs (BackwardSignal's order holds). The inputs' gradients must be returned.
            var result = new List<Tensor> { null! };
            int next = 0;
            for (int i = 0; i < inputs.Length; i++) result.Add(segment.InputNeedsGrad[i] ? grads[next++]?.MoveToOuterDisposeScope()! : null!);
            for (int i = 0; i < parameters.Length; i++)
            {
                var g = segment.ParameterNeedsGrad[i] ? grads[next++] : null;
                if (g is not null && parameters[i].is_leaf) { AccumulateGrad(parameters[i], g); g = null; }
                result.Add(g?.MoveToOuterDisposeScope()!);
            }
            // A declared leaf is used by this run alone: its gradient is what the plain backward would leave in its .grad.
            foreach (var leaf in leaves)
                if (grads[next++] is { } g) leaf.grad = g.detach().clone().DetachFromDisposeScope();
            // A leaf is an alias of a gathered weight: emptied, it no longer keeps the freed layer's storage alive (only its .grad is read later).
            if (segment.Gathered is not null)
                using (no_grad())
                    foreach (var leaf in leaves)
                    {
                        using var nothing = empty(0, dtype: leaf.dtype, device: leaf.device);
                        leaf.set_(nothing);
                    }
            return result;
        }

        // The autograd engine's AccumulateGrad without create_graph: the first gradient stored in a buffer laid out as the
        // parameter (clone_obey_contract), later ones added in place; the same bits as returning it to the engine.
        static void AccumulateGrad(Tensor parameter, Tensor g)
        {
            using var _ = no_grad();
            using var existing = parameter.grad;
            if (existing is not null) existing.add_(g);
            else parameter.grad = empty_like(parameter).copy_(g);
        }
    }
}
