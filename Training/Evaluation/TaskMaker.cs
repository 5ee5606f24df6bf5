// Makes the shipped evaluation tasks from the held-out chapters of the shipped corpus (data/tasks, `gpu-worker
// make-tasks`). No download, no randomness that depends on the .NET version: the same corpus gives the same bytes.
using System.Text.Encodings.Web;
using System.Text.Json;
using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.Training.Harness;

public static class TaskMaker
{
    public const string Cloze = "kjv_cloze", NextVerse = "kjv_nextverse", HeldOut = "kjv_heldout";

    /// <summary>The data service's default validation fraction (PrepareRequest.validation_fraction unset).</summary>
    public const double DefaultValidationFraction = 0.05;

    static readonly JsonSerializerOptions Json = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>
    /// The chapters a prepared dataset of the corpus holds out: the cluster's split (DatasetSplit), not the standalone
    /// trainer's seeded one. Cleaning leaves the corpus's chapters unchanged (ASCII, trimmed), so the hash is the service's.
    /// </summary>
    public static List<string> HeldOutChapters(IEnumerable<string> chapters, double fraction = DefaultValidationFraction) =>
        chapters.Where(c => DatasetSplit.IsValidation(DatasetSplit.TextHash(c), fraction)).ToList();

    /// <summary>Writes the three tasks into <paramref name="folder"/>; returns their paths.</summary>
    public static IReadOnlyList<string> Write(string folder, IReadOnlyList<string> chapters, int maxItems = 500, ulong seed = 21)
    {
        if (chapters.Count < 2) throw new ArgumentException($"the tasks need at least 2 held-out chapters (distractors come from other chapters), got {chapters.Count}");
        Directory.CreateDirectory(folder);
        var parsed = chapters.Select(c => c.Split('\n')).Where(l => l.Length >= 3).ToList();
        return
        [
            WriteLines(folder, Cloze, ClozeItems(parsed, maxItems, seed)),
            WriteLines(folder, NextVerse, NextVerseItems(parsed, maxItems, seed)),
            WriteLines(folder, HeldOut, chapters.Select(c => (object)new { text = c })),
        ];
    }

    // ---- LAMBADA-style: the last word of a verse, after the verses before it ----

    static IEnumerable<object> ClozeItems(List<string[]> chapters, int maxItems, ulong seed)
    {
        var items = new List<(ulong Key, object Item)>();
        for (int c = 0; c < chapters.Count; c++)
        {
            var lines = chapters[c];
            for (int v = 2; v < lines.Length; v++) // a verse with at least one verse before it
            {
                var verse = lines[v];
                int space = verse.LastIndexOf(' ');
                if (space < 0) continue;
                var word = verse[(space + 1)..].TrimEnd('.', ',', ';', ':', '?', '!', '\'', ')');
                // A content word the passage itself makes likely: LAMBADA keeps targets that need the wider context.
                if (word.Length < 4 || !word.All(char.IsAsciiLetter)) continue;
                var before = string.Join('\n', lines[Math.Max(1, v - 4)..v]);
                if (!before.Contains(word, StringComparison.Ordinal)) continue;
                var context = lines[0] + "\n" + before + "\n" + verse[..space];
                items.Add((Key(seed, 1, (ulong)c, (ulong)v), new { context, target = " " + word }));
            }
        }
        return Pick(items, maxItems);
    }

    // ---- HellaSwag-style: which verse comes next, three distractors from other chapters ----

    static IEnumerable<object> NextVerseItems(List<string[]> chapters, int maxItems, ulong seed)
    {
        var pool = chapters.SelectMany((l, c) => l.Skip(1).Select(v => (Chapter: c, Verse: v, Hash: StableHash.OfText(v, seed)))).ToList();
        var items = new List<(ulong Key, object Item)>();
        for (int c = 0; c < chapters.Count; c++)
        {
            var lines = chapters[c];
            for (int v = 2; v < lines.Length; v++)
            {
                var gold = lines[v];
                var context = lines[0] + "\n" + string.Join('\n', lines[Math.Max(1, v - 3)..v]) + "\n";
                // Distractors near the gold verse's length, so that length alone does not give the answer away.
                var near = pool.Where(p => p.Chapter != c && p.Verse != gold)
                    .OrderBy(p => Math.Abs(p.Verse.Length - gold.Length)).ThenBy(p => Key(seed, 2, (ulong)c, (ulong)v, (ulong)p.Verse.Length, p.Hash))
                    .Take(24).ToList();
                var distractors = near.OrderBy(p => Key(seed, 3, (ulong)c, (ulong)v, p.Hash)).Select(p => p.Verse).Distinct().Take(3).ToList();
                if (distractors.Count < 3) continue;
                int goldAt = (int)(Key(seed, 4, (ulong)c, (ulong)v) % 4);
                distractors.Insert(goldAt, gold);
                items.Add((Key(seed, 5, (ulong)c, (ulong)v), new { context, choices = distractors, gold = goldAt }));
            }
        }
        return Pick(items, maxItems);
    }

    /// <summary>A seeded sample of at most <paramref name="max"/> items, kept in corpus order.</summary>
    static IEnumerable<object> Pick(List<(ulong Key, object Item)> items, int max)
    {
        var chosen = items.Select((x, i) => (x.Key, i)).OrderBy(x => x.Key).Take(max).Select(x => x.i).Order();
        return chosen.Select(i => items[i].Item);
    }

    static ulong Key(ulong seed, params ulong[] parts) => parts.Aggregate(StableHash.Mix(seed), StableHash.Combine);

    static string WriteLines(string folder, string name, IEnumerable<object> items)
    {
        var path = Path.Combine(folder, name + ".jsonl");
        var tmp = path + ".tmp";
        using (var writer = new StreamWriter(tmp, append: false, new System.Text.UTF8Encoding(false)) { NewLine = "\n" })
            foreach (var item in items) writer.WriteLine(JsonSerializer.Serialize(item, Json));
        File.Move(tmp, path, overwrite: true);
        return path;
    }
}
