// The overlap's autograd signal: called once the gradient is complete, the gradient passed on unchanged, and an error in
// its listener handed back instead of unwinding through libtorch's engine (which aborts the process).
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Checkpoints;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Model;

public sealed class BackwardSignalTests
{
    sealed class Listener(Func<Tensor?, bool> done, Tensor watched) : IBackwardListener
    {
        public int Calls;
        public Exception? Error;
        public bool SawWholeGradient;

        public void Done()
        {
            Calls++;
            using var g = watched.grad;
            SawWholeGradient = done(g);
        }

        public void Failed(Exception error) => Error = error;
    }

    /// <summary>
    /// y = Σ 3·wᵢ·sᵢ with s = signal(2x): w is used only after the signal, so when the signal runs w's AccumulateGrad has
    /// run and w.grad is the whole dy/dw = 6x; x's gradient is dy/dx = 6w, as without the signal.
    /// </summary>
    [Fact]
    public void TheListenerRunsOnceAfterTheParametersUsedAfterItHaveTheirGradientAndTheGradientPassesUnchanged()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new double[] { 1, -2, 3 }).requires_grad_();
        var w = tensor(new double[] { 0.5, 4, -1 }).requires_grad_();
        var wValues = new[] { 0.5, 4, -1 };
        var xValues = new[] { 1.0, -2, 3 };
        var listener = new Listener(g => g is not null && g.data<double>().ToArray().SequenceEqual(xValues.Select(v => 3 * 2 * v)), w);
        var s = BackwardSignal.Around(x * 2, listener);
        var y = (w * s * 3).sum();
        y.backward();

        Assert.Equal(1, listener.Calls);
        Assert.Null(listener.Error);
        Assert.True(listener.SawWholeGradient, "w's gradient was not complete when the signal ran");
        Assert.Equal(wValues.Select(v => 3 * v * 2), x.grad!.data<double>().ToArray());
    }

    /// <summary>Copies its parameters' gradients when signalled (on the backward's own thread: no race with the engine).</summary>
    sealed class Snapshot(IReadOnlyList<(string Name, Tensor Param)> parameters) : IBackwardListener
    {
        public readonly IReadOnlyList<(string Name, Tensor Param)> Parameters = parameters;
        public double[]?[]? Seen;

        public void Done()
        {
            Seen = [.. Parameters.Select(p => { using var g = p.Param.grad; return g?.data<double>().ToArray(); })];
        }

        public Exception? Error;
        public void Failed(Exception error) => Error = error;
    }

    /// <summary>
    /// The micro model (3 layers, an MTP module, float64), one forward with MTP and the balance loss, one backward: when
    /// each decoder layer's signal (main and MTP) and the head's (the final norm's input) run, every parameter of their
    /// group already holds its whole gradient, the value it has when the backward returns. The overlap reads them then;
    /// on its exchange thread that read races with the backward, which is why this checks on the backward's thread
    /// (a head signal moved after the final norm fails here on the norm's weight).
    /// </summary>
    [Fact]
    public void EveryLayersAndTheHeadsSignalFindsItsParametersGradientsComplete()
    {
        using var scope = NewDisposeScope();
        var (vocab, data) = MicroModel.Data.Value;
        using var model = DeepSeekForCausalLM.FromSeed(MicroModel.Config(vocab), 5);
        model.to(ScalarType.Float64);
        model.train();
        static List<(string, Tensor)> Named(nn.Module m, string prefix) => [.. m.named_parameters().Select(p => ($"{prefix}.{p.name}", (Tensor)p.parameter))];
        var layers = model.model.layers.Select((l, i) => (l, Named(l, $"layer {i}")))
            .Concat(model.mtp.Select((m, k) => (m.block, Named(m.block, $"mtp {k} block")))).ToList();
        var headParams = Named(model.model.norm, "norm").Concat(Named(model.lm_head, "lm_head"))
            .Concat(model.mtp.SelectMany((m, k) => Named(m.enorm, $"mtp {k} enorm").Concat(Named(m.hnorm, $"mtp {k} hnorm"))
                .Concat(Named(m.eh_proj, $"mtp {k} eh_proj")).Concat(Named(m.shared_head, $"mtp {k} shared_head")))).ToList();
        var snapshots = layers.Select(l => { var s = new Snapshot(l.Item2); l.Item1.BackwardDone = s; return s; }).ToList();
        var head = new Snapshot(headParams);
        model.model.HeadBackwardDone = head;

        var batch = data.Batch([0, 1]);
        var output = model.Forward(batch.narrow(1, 0, MicroModel.SeqLen - 2), withMtp: true);
        var loss = Evaluation.CrossEntropy(output.Logits_BTV, batch.narrow(1, 1, MicroModel.SeqLen - 2))
                   + Evaluation.CrossEntropy(output.MtpLogits[0], batch.narrow(1, 2, output.MtpLogits[0].shape[1])) * 0.3;
        if (output.AuxLoss is { } aux) loss = loss + aux;
        loss.backward();

        Assert.True(model.mtp.Count > 0 && headParams.Count >= 6, "the micro model should have an MTP module");
        foreach (var snapshot in snapshots.Append(head))
        {
            Assert.Null(snapshot.Error);
            Assert.NotNull(snapshot.Seen);
            for (int i = 0; i < snapshot.Parameters.Count; i++)
            {
                var (name, p) = snapshot.Parameters[i];
                using var g = p.grad;
                if (g is null) continue; // unused in this pass (an expert no token reached): no gradient then or later
                Assert.True(snapshot.Seen![i] is { } seen && seen.SequenceEqual(g.data<double>().ToArray()), $"{name}'s gradient was not complete when its signal ran");
            }
        }
    }

    /// <summary>
    /// A signal keeps no copy of the tensor it wraps: TorchSharp's function node would keep an <c>empty_like</c> of its
    /// output until the graph is freed, one more (B, T, D) per layer for the whole backward; FunctionOutputCache shrinks
    /// it to one element. Around an 8 MiB tensor the heap (MallocHeap) grows by less than a tenth of that, and the
    /// gradient is still the one without the signal.
    /// </summary>
    [Fact]
    public void ASignalKeepsNoCopyOfTheTensorItWraps()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var x = randn(1 << 20, dtype: ScalarType.Float64).requires_grad_();
        var w = randn(1 << 20, dtype: ScalarType.Float64);
        long copy = x.numel() * sizeof(double), before = MallocHeap.BytesInUse();
        var s = BackwardSignal.Around(x, new Snapshot([]));
        long kept = MallocHeap.BytesInUse() - before;
        Assert.True(kept < copy / 10, $"the signal keeps {kept} bytes around a tensor of {copy}");
        (w * s).sum().backward();
        Assert.True(TrainedState.BitwiseEqual(w, x.grad!), "the gradient through the signal is not w");
    }

    /// <summary>
    /// The tiny model (4 layers and an MTP block, float64) with a signal on every block and on the head gives the loss and
    /// every gradient it gives without them, bit for bit: the stand-in for each node's output copy changes no value.
    /// </summary>
    [Fact]
    public void SignalsOnEveryLayerChangeNoGradientBit()
    {
        var (vocab, data) = MicroModel.Data.Value;
        using var model = DeepSeekForCausalLM.FromSeed(DeepSeekConfig.Tiny(vocab), 5);
        model.to(ScalarType.Float64);
        model.train();
        var blocks = model.model.layers.Concat(model.mtp.Select(m => m.block)).ToList();
        var batch = data.Batch([0, 1, 2, 3]);
        long T = MicroModel.SeqLen - 2;

        (double Loss, Dictionary<string, double[]> Grads) Pass(bool signals)
        {
            foreach (var block in blocks) block.BackwardDone = signals ? new Snapshot([]) : null;
            model.model.HeadBackwardDone = signals ? new Snapshot([]) : null;
            foreach (var p in model.parameters()) p.grad?.zero_();
            using var scope = NewDisposeScope();
            var output = model.Forward(batch.narrow(1, 0, T), withMtp: true);
            var loss = Evaluation.CrossEntropy(output.Logits_BTV, batch.narrow(1, 1, T))
                       + Evaluation.CrossEntropy(output.MtpLogits[0], batch.narrow(1, 2, output.MtpLogits[0].shape[1])) * 0.3;
            if (output.AuxLoss is { } aux) loss = loss + aux;
            loss.backward();
            var grads = model.named_parameters().Where(p => p.parameter.grad is not null)
                .ToDictionary(p => p.name, p => { using var g = p.parameter.grad!; return g.data<double>().ToArray(); });
            return (loss.item<double>(), grads);
        }

        var plain = Pass(false);
        var signalled = Pass(true);
        Assert.Equal(plain.Loss, signalled.Loss);
        Assert.Equal(plain.Grads.Keys.Order(), signalled.Grads.Keys.Order());
        Assert.All(plain.Grads, kv => Assert.True(kv.Value.AsSpan().SequenceEqual(signalled.Grads[kv.Key]), $"{kv.Key}'s gradient differs with the signals"));
    }

    /// <summary>
    /// A listener that throws: the backward completes (x still gets its gradient) and the error reaches Failed. Without
    /// the catch the exception would unwind into libtorch's engine, and .NET aborts the process on that (the test host dies).
    /// </summary>
    [Fact]
    public void AListenerThatThrowsHandsItsErrorBackAndTheBackwardCompletes()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new double[] { 1, 2 }).requires_grad_();
        var listener = new Listener(_ => throw new InvalidOperationException("the exchange is gone (injected)"), x);
        var y = (BackwardSignal.Around(x, listener) * 5).sum();
        y.backward();

        Assert.Equal(1, listener.Calls);
        Assert.Equal("the exchange is gone (injected)", Assert.IsType<InvalidOperationException>(listener.Error).Message);
        Assert.Equal(new[] { 5.0, 5.0 }, x.grad!.data<double>().ToArray());
    }
}
