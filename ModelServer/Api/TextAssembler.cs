// Turns a growing list of generated token ids into text deltas, cutting at the first stop string. No sampling here.
using DeepSeekCluster.Text.Tokenization;

namespace DeepSeekCluster.ModelServer.Api;

/// <summary>
/// Decodes all generated ids each time (a token may complete a UTF-8 character begun by the previous one), releases
/// only text that cannot turn into a stop string or an incomplete character, and reports where a stop string
/// begins. Without a tokenizer the text is the ids, each preceded by a space (as <c>gpu-worker generate</c> prints them).
/// </summary>
public sealed class TextAssembler(BpeTokenizer? tokenizer, IReadOnlyList<string> stops)
{
    readonly List<int> ids = [];
    string text = "";
    int released;

    public bool Stopped { get; private set; }
    public IReadOnlyList<int> Ids => ids;

    /// <summary>Adds a token and returns the text that may be sent now (possibly empty).</summary>
    public string Add(int id)
    {
        ids.Add(id);
        text = tokenizer is null ? text + " " + id : tokenizer.Decode(ids);
        int cut = FirstStop();
        if (cut >= 0)
        {
            Stopped = true;
            return Release(cut);
        }
        int safe = text.Length;
        while (safe > released && text[safe - 1] == '\uFFFD') safe--; // an incomplete UTF-8 sequence so far
        foreach (var s in stops)
            for (int k = Math.Min(s.Length - 1, safe - released); k > 0; k--)
                if (string.CompareOrdinal(text, safe - k, s, 0, k) == 0) { safe -= k; break; }
        return Release(safe);
    }

    /// <summary>The rest, once generation has ended (without a stop).</summary>
    public string Flush() => Stopped ? "" : Release(text.Length);

    string Release(int upTo)
    {
        if (upTo <= released) return "";
        var delta = text[released..upTo];
        released = upTo;
        return delta;
    }

    int FirstStop()
    {
        int first = -1;
        foreach (var s in stops)
        {
            int i = text.IndexOf(s, Math.Max(0, released - s.Length + 1), StringComparison.Ordinal);
            if (i >= 0 && (first < 0 || i < first)) first = i;
        }
        return first;
    }

    /// <summary>The visible text of token i alone (for logprobs).</summary>
    public string TokenText(int id) => tokenizer is null ? " " + id : tokenizer.Decode([id]);
}
