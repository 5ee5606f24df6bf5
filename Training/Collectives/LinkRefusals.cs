// Counts and announces data-plane connections refused by the membership proof or the generation fence; holds no key.
using System.Diagnostics.Metrics;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>One refused connection: which link kind ("ring" or "stage"), the remote address, and why.</summary>
public sealed record LinkRefusal(string Link, string Remote, string Reason);

/// <summary>
/// Every refusal on a ring rendezvous or a stage listener (an outsider without the key, a replayed handshake, a zombie
/// of another generation), and every listener a dialer found unable to prove membership, is counted on
/// <c>deepseek.worker.link_refusals{link}</c> (exported as <c>deepseek_worker_link_refusals_total</c>) and raised as
/// <see cref="Refused"/>, which the worker turns into one log line. Process-wide, as the metric is.
/// </summary>
public static class LinkRefusals
{
    public const string MeterName = "DeepSeekCluster.Training.Links";
    public const string Ring = "ring", Stage = "stage";

    static readonly Meter Meter = new(MeterName);
    static readonly Counter<long> Counter = Meter.CreateCounter<long>("deepseek.worker.link_refusals", "{connection}",
        "data-plane connections refused: no or wrong link key, a replayed handshake, another job or generation (link = ring, stage)");

    /// <summary>Raised on the thread that refused; handlers must not block.</summary>
    public static event Action<LinkRefusal>? Refused;

    /// <summary>Subscribes <paramref name="handler"/> to <see cref="Refused"/> until the result is disposed.</summary>
    public static IDisposable Subscribe(Action<LinkRefusal> handler)
    {
        Refused += handler;
        return new Subscription(handler);
    }

    sealed class Subscription(Action<LinkRefusal> handler) : IDisposable
    {
        public void Dispose() => Refused -= handler;
    }

    static LinkRefusals()
    {
        // Both series exist from the start, so an alert on their rate sees the first refusal.
        Counter.Add(0, new KeyValuePair<string, object?>("link", Ring));
        Counter.Add(0, new KeyValuePair<string, object?>("link", Stage));
    }

    internal static void Record(string link, string remote, string reason)
    {
        Counter.Add(1, new KeyValuePair<string, object?>("link", link));
        Refused?.Invoke(new LinkRefusal(link, remote, reason));
    }
}
