// Progress output a person can follow: a live line on a terminal, plain log lines when output is redirected (CI, files).
using System.Diagnostics;

namespace DeepSeekCluster.Training.Engine;

public sealed class ConsoleProgress
{
    readonly TextWriter output;
    readonly bool live;
    readonly Stopwatch clock = Stopwatch.StartNew();
    int lastLength;

    public ConsoleProgress(TextWriter? output = null, bool? live = null)
    {
        this.output = output ?? Console.Out;
        this.live = live ?? (!Console.IsOutputRedirected && Environment.GetEnvironmentVariable("CI") is null);
    }

    /// <summary>A message that stays on screen.</summary>
    public void Line(string message)
    {
        ClearLive();
        output.WriteLine(message);
    }

    /// <summary>A step report: rewritten in place on a terminal, printed every <paramref name="logEvery"/> steps otherwise.</summary>
    public void Step(StepMetrics m, long totalSteps, int workers, int logEvery, string? extra = null)
    {
        var text = Format(m, totalSteps, workers, clock.Elapsed, extra);
        if (live)
        {
            var padded = "\r" + text.PadRight(lastLength);
            lastLength = text.Length;
            output.Write(padded);
            if (m.Step % logEvery == 0 || m.Step == totalSteps) { output.WriteLine(); lastLength = 0; }
        }
        else if (m.Step % logEvery == 0 || m.Step == totalSteps || m.Step == 1)
            output.WriteLine(text);
    }

    public static string Format(StepMetrics m, long totalSteps, int workers, TimeSpan elapsed, string? extra = null)
    {
        double perStep = elapsed.TotalSeconds / Math.Max(1, m.Step);
        var eta = TimeSpan.FromSeconds(perStep * Math.Max(0, totalSteps - m.Step));
        var mtp = m.MtpLoss is double l ? $" (mtp {l:F3})" : "";
        return $"step {m.Step}/{totalSteps} | loss {m.Loss:F4}{mtp} | lr {m.LearningRate:E2} | gnorm {m.GradNorm:F2} | " +
               $"{m.TokensPerSecond / 1000:F1}k tok/s | MFU {m.Mfu * 100:F1}% | balance {m.LoadImbalance:F2} | workers {workers} | ETA {eta:hh\\:mm\\:ss}" +
               (extra is null ? "" : " | " + extra);
    }

    void ClearLive()
    {
        if (live && lastLength > 0) { output.Write("\r" + new string(' ', lastLength) + "\r"); lastLength = 0; }
    }
}
