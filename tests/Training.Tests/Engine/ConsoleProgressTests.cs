// The standalone trainer's progress: a line rewritten in place on a terminal, plain log lines when output is not one.
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.Training.Tests.Engine;

public class ConsoleProgressTests
{
    static StepMetrics Step(long step, double tokensPerSecond = 12_345) => new(step, 3.25, 3.5, null, 1e-3, 0.75, tokensPerSecond, 0.125,
        new StepTimes(0.1, 0.2, 0.3, 0, 0.1), [new long[] { 30, 10 }]);

    static Func<string, string?> Env(params (string Key, string Value)[] vars) => k => vars.FirstOrDefault(v => v.Key == k).Value;

    [Fact]
    public void LiveOnlyOnATerminalWithoutCiNoColorOrADumbTerm()
    {
        Assert.True(ConsoleProgress.IsLive(false, Env(("TERM", "xterm-256color"))));
        Assert.False(ConsoleProgress.IsLive(true, Env()));
        Assert.False(ConsoleProgress.IsLive(false, Env(("CI", "true"))));
        Assert.False(ConsoleProgress.IsLive(false, Env(("NO_COLOR", "1"))));
        Assert.False(ConsoleProgress.IsLive(false, Env(("TERM", "dumb"))));
    }

    [Fact]
    public void TheLineCarriesStepOfTotalLossThroughputMfuWorkersAndEta()
    {
        // 10 of 40 steps in 20 s: 2 s a step, 30 steps left = 60 s.
        var text = ConsoleProgress.Format(Step(10), 40, 3, TimeSpan.FromSeconds(20));
        Assert.Equal("step 10/40 | loss 3.2500 (mtp 3.500) | lr 1.00E-003 | gnorm 0.75 | 12.3k tok/s | MFU 12.5% | balance 1.50 | workers 3 | ETA 00:01:00", text);
    }

    /// <summary>
    /// A small CPU run (a few hundred tokens/s) read "0.3k tok/s", a tiny one "0.0k"; a GPU cluster's millions "1234.6k".
    /// Three significant digits at any size; rounding decides the prefix (999.7 is "1.00k", not "1000").
    /// </summary>
    [Theory]
    [InlineData(412.4, "412 tok/s")]
    [InlineData(41.24, "41.2 tok/s")]
    [InlineData(4.124, "4.12 tok/s")]
    [InlineData(0.4124, "0.412 tok/s")]
    [InlineData(0, "0 tok/s")]
    [InlineData(999.7, "1.00k tok/s")]
    [InlineData(1_000, "1.00k tok/s")]
    [InlineData(123_456, "123k tok/s")]
    [InlineData(1_234_567, "1.23M tok/s")]
    [InlineData(9_996_000, "10.0M tok/s")]
    [InlineData(4.2e9, "4.20G tok/s")]
    [InlineData(double.NaN, "tok/s -")]
    public void TheThroughputKeepsThreeSignificantDigitsFromAFewTokensToMillions(double tokensPerSecond, string shown)
    {
        var text = ConsoleProgress.Format(Step(10, tokensPerSecond), 40, 3, TimeSpan.FromSeconds(20));
        Assert.Contains($" | gnorm 0.75 | {shown} | MFU ", text);
    }

    [Fact]
    public void PlainOutputPrintsTheFirstEveryNthAndTheLastStepAsWholeLines()
    {
        var output = new StringWriter();
        var progress = new ConsoleProgress(output, live: false);
        for (long s = 1; s <= 25; s++) progress.Step(Step(s), 25, 1, logEvery: 10);
        var lines = output.ToString().Split(Environment.NewLine, StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(["step 1/25", "step 10/25", "step 20/25", "step 25/25"], lines.Select(l => l[..l.IndexOf(" |", StringComparison.Ordinal)]));
        Assert.DoesNotContain('\r', output.ToString());
        Assert.DoesNotContain('\u001b', output.ToString());
    }

    [Fact]
    public void LiveOutputRewritesOneLineInPlaceAndKeepsEveryNthStep()
    {
        var output = new StringWriter();
        var progress = new ConsoleProgress(output, live: true);
        for (long s = 1; s <= 4; s++) progress.Step(Step(s), 4, 1, logEvery: 2);
        progress.Line("done");
        // On screen: steps 1 and 2 share a line (2 erased 1 and stayed), as do 3 and 4; then the message.
        var lines = output.ToString().Split(Environment.NewLine);
        Assert.Equal(4, lines.Length); // the last is empty: everything ended with a newline
        Assert.Equal("done", lines[2]);
        Assert.Equal("", lines[3]);
        foreach (var (line, first) in new[] { (lines[0], 1), (lines[1], 3) })
        {
            var draws = line.Split(ConsoleProgress.ClearLine);
            Assert.Equal(3, draws.Length); // "", the first draw, the second draw
            Assert.Equal("", draws[0]);
            Assert.StartsWith($"step {first}/4 |", draws[1]);
            Assert.StartsWith($"step {first + 1}/4 |", draws[2]);
        }
    }

    [Fact]
    public void AMessageErasesTheLiveLineBeforeItPrints()
    {
        var output = new StringWriter();
        var progress = new ConsoleProgress(output, live: true);
        progress.Step(Step(1), 10, 1, logEvery: 5);
        progress.Line("checkpoint saved");
        Assert.EndsWith(ConsoleProgress.ClearLine + "checkpoint saved" + Environment.NewLine, output.ToString());
    }
}
