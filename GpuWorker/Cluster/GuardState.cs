// The step guard's memory (SpikeRule): the window of recent good steps and its counters. It belongs to the training
// state, not to one generation: it travels with the live state (a re-formation's broadcast) and in every checkpoint's
// manifest, so a re-formed or resumed job judges its next step on the same history as the undisturbed run.
using System.Globalization;
using System.Text.Json.Nodes;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// The rule's state after judging step <paramref name="Step"/>: the losses and log gradient norms of the last good steps
/// after the warm-up (oldest first), the non-finite steps in a row, the rollbacks so far and the learning-rate multiplier.
/// </summary>
public sealed record GuardState(long Step, double[] Losses, double[] LogNorms, int SkipsInRow, int Rollbacks, double LrScale)
{
    /// <summary>The manifest key: committed with rank 0's manifest, read back when a generation resumes from it.</summary>
    public const string ManifestKey = "step_guard";

    public static GuardState Empty(long step) => new(step, [], [], 0, 0, 1);

    public bool Equals(GuardState? other) =>
        other is not null && Step == other.Step && Losses.SequenceEqual(other.Losses) && LogNorms.SequenceEqual(other.LogNorms)
        && SkipsInRow == other.SkipsInRow && Rollbacks == other.Rollbacks && LrScale.Equals(other.LrScale);

    public override int GetHashCode() => HashCode.Combine(Step, Losses.Length, SkipsInRow, Rollbacks, LrScale);

    public override string ToString() =>
        $"after step {Step}: {Losses.Length} good steps (loss median {SpikeRule.Median(Losses):G4}), {SkipsInRow} skipped in a row, {Rollbacks} rollbacks, lr x{LrScale:G4}";

    // ---- As longs, for the live-state broadcast (fixed length for a window, doubles as their bits) ----

    /// <summary>The broadcast length for a window of <paramref name="window"/> steps: every rank of a job computes the same.</summary>
    public static int Longs(int window) => 6 + 2 * window;

    public long[] ToLongs(int window)
    {
        if (Losses.Length > window || LogNorms.Length != Losses.Length)
            throw new InvalidOperationException($"the step guard holds {Losses.Length} losses and {LogNorms.Length} norms for a window of {window}");
        var v = new long[Longs(window)];
        (v[0], v[1], v[2], v[3], v[4], v[5]) = (1, Step, Losses.Length, SkipsInRow, Rollbacks, BitConverter.DoubleToInt64Bits(LrScale));
        for (int i = 0; i < Losses.Length; i++)
        {
            v[6 + i] = BitConverter.DoubleToInt64Bits(Losses[i]);
            v[6 + window + i] = BitConverter.DoubleToInt64Bits(LogNorms[i]);
        }
        return v;
    }

    /// <summary>The state <see cref="ToLongs"/> wrote; null where the first long says none was held.</summary>
    public static GuardState? FromLongs(long[] v, int window)
    {
        if (v.Length != Longs(window)) throw new InvalidDataException($"a step guard state of {v.Length} longs; expected {Longs(window)} for a window of {window}");
        if (v[0] == 0) return null;
        int n = checked((int)v[2]);
        if (n < 0 || n > window) throw new InvalidDataException($"a step guard state with {n} steps in a window of {window}");
        return new GuardState(v[1], [.. v.Skip(6).Take(n).Select(BitConverter.Int64BitsToDouble)], [.. v.Skip(6 + window).Take(n).Select(BitConverter.Int64BitsToDouble)],
                              checked((int)v[3]), checked((int)v[4]), BitConverter.Int64BitsToDouble(v[5]));
    }

    // ---- In a checkpoint manifest (doubles written round-trip exact) ----

    public JsonObject ToJson() => new()
    {
        ["step"] = Step, ["skips_in_row"] = SkipsInRow, ["rollbacks"] = Rollbacks, ["lr_scale"] = Text(LrScale),
        ["losses"] = new JsonArray([.. Losses.Select(x => (JsonNode?)Text(x))]),
        ["log_norms"] = new JsonArray([.. LogNorms.Select(x => (JsonNode?)Text(x))]),
    };

    /// <summary>Reads <see cref="ToJson"/>'s object; <paramref name="source"/> names it in the error for anything else.</summary>
    public static GuardState FromJson(JsonNode node, string source)
    {
        try
        {
            double[] Values(string key) => [.. (node[key] as JsonArray ?? throw new InvalidDataException($"no \"{key}\" array")).Select(x => Parse(x!.GetValue<string>()))];
            var state = new GuardState(node["step"]!.GetValue<long>(), Values("losses"), Values("log_norms"), node["skips_in_row"]!.GetValue<int>(),
                                       node["rollbacks"]!.GetValue<int>(), Parse(node["lr_scale"]!.GetValue<string>()));
            return state.LogNorms.Length == state.Losses.Length ? state
                : throw new InvalidDataException($"{state.Losses.Length} losses but {state.LogNorms.Length} norms");
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or NullReferenceException or InvalidDataException)
        {
            throw new InvalidDataException($"{source}: \"{ManifestKey}\" is not a step guard state ({e.Message}): {node.ToJsonString()}", e);
        }
    }

    // "R" keeps every bit, NaN and infinities included (JSON numbers cannot hold those).
    static string Text(double x) => x.ToString("R", CultureInfo.InvariantCulture);
    static double Parse(string s) => double.Parse(s, NumberStyles.Float, CultureInfo.InvariantCulture);
}
