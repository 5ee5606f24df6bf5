// The overlap's autograd signal: called once the gradient is complete, the gradient passed on unchanged, and an error in
// its listener handed back instead of unwinding through libtorch's engine (which aborts the process).
using DeepSeekCluster.Training.Model;
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
