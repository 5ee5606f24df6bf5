// Progress lines of one prepare stage, with documents, megabytes and the stage's MB/s so far.
using System.Diagnostics;

namespace DeepSeekCluster.DataShardService.Preparation;

/// <summary>
/// Reports "{stage}: N documents, X MB in T s (R MB/s){detail}" every <see cref="Interval"/> while the stage runs,
/// and once when it is done, so a long prepare shows where it is and how fast it goes. MB are 10^6 bytes of UTF-8 text.
/// </summary>
internal sealed class StageMeter(string stage, IProgress<string>? progress)
{
    public static readonly TimeSpan Interval = TimeSpan.FromSeconds(2);

    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private TimeSpan _next = Interval;

    public long Documents { get; private set; }

    public long Bytes { get; private set; }

    /// <summary><paramref name="detail"/> is only evaluated when a line is due.</summary>
    public void Add(long documents, long bytes, Func<string>? detail = null)
    {
        Documents += documents;
        Bytes += bytes;
        if (progress is null || _clock.Elapsed < _next)
            return;
        _next = _clock.Elapsed + Interval;
        progress.Report(Line(detail?.Invoke()));
    }

    public void Done(string detail) => progress?.Report(Line(detail) + " (done)");

    private string Line(string? detail)
    {
        double seconds = _clock.Elapsed.TotalSeconds;
        return $"{stage}: {Documents} documents, {Bytes / 1e6:F1} MB in {seconds:F1} s ({Bytes / 1e6 / Math.Max(seconds, 1e-3):F1} MB/s){detail}";
    }
}
