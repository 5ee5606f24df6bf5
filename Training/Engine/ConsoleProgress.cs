// Progress output a person can follow: a live line on a terminal, plain log lines when output is redirected (CI, files).
using System.Diagnostics;
using DeepSeekCluster.Text.Display;

namespace DeepSeekCluster.Training.Engine;

public sealed class ConsoleProgress
{
    readonly TextWriter output;
    readonly bool live;
    readonly Stopwatch clock = Stopwatch.StartNew();
    int lastLength;
    bool warnedCapped;

    /// <summary>Back to the start of the line and erase it.</summary>
    public const string ClearLine = "\r\u001b[2K";

    public ConsoleProgress(TextWriter? output = null, bool? live = null)
    {
        this.output = output ?? Console.Out;
        this.live = live ?? IsLive(Console.IsOutputRedirected, Environment.GetEnvironmentVariable);
    }

    /// <summary>
    /// The live line needs a terminal that understands it: output not redirected, not CI, TERM not "dumb", NO_COLOR unset
    /// (whoever sets NO_COLOR asks for plain output). Otherwise every report is a plain line.
    /// </summary>
    public static bool IsLive(bool outputRedirected, Func<string, string?> environment) =>
        !outputRedirected && environment("CI") is null && environment("NO_COLOR") is null && environment("TERM") != "dumb";

    public bool Live => live;

    /// <summary>A message that stays on screen.</summary>
    public void Line(string message)
    {
        ClearLive();
        output.WriteLine(message);
    }

    /// <summary>A step report: rewritten in place on a terminal, printed every <paramref name="logEvery"/> steps otherwise.</summary>
    public void Step(StepMetrics m, long totalSteps, int workers, int logEvery, string? extra = null)
    {
        if (!warnedCapped && m.Utilization.Capped && m.Peak is { } peak)
        {
            Line("warning: " + m.Utilization.Warning(peak));
            warnedCapped = true;
        }
        var text = Format(m, totalSteps, workers, clock.Elapsed, extra);
        if (live)
        {
            // Carriage return and erase-line (ANSI): the line is rewritten in place; every logEvery steps it stays.
            output.Write(ClearLine + text);
            lastLength = text.Length;
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
               $"{TokenThroughput.Format(m.TokensPerSecond)} | MFU {m.Mfu * 100:F1}%{PeakNote(m)} | balance {m.LoadImbalance:F2} | workers {workers} | ETA {eta:hh\\:mm\\:ss}" +
               (extra is null ? "" : " | " + extra);
    }

    /// <summary>" of 67.0 TFLOP/s declared": which peak the MFU is against; a capped reading says the peak looks too low.</summary>
    static string PeakNote(StepMetrics m) => m.Peak is not { FlopsPerSecond: > 0 } peak ? ""
        : $" {peak.Tag}" + (m.Utilization.Capped ? $" (capped: {m.Utilization.Raw:F2}× the peak, which looks too low)" : "");

    void ClearLive()
    {
        if (live && lastLength > 0) { output.Write(ClearLine); lastLength = 0; }
    }
}
