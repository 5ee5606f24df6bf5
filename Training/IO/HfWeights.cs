// Hugging Face weight folders: model.safetensors, or shards plus model.safetensors.index.json, as save_pretrained writes them.
using System.Text.Json;
using System.Text.RegularExpressions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>
/// Reads and writes the weight files of a Hugging Face model folder. One file when the weights fit in
/// <c>maxShardBytes</c>; otherwise <c>model-00001-of-0000N.safetensors</c>... and an index mapping every
/// tensor name to its shard, split the way huggingface_hub splits a state dict.
/// </summary>
public static partial class HfWeights
{
    public const string SingleFileName = "model.safetensors";
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>
    /// Writes <paramref name="tensors"/> into <paramref name="dir"/> (created if needed), sharded in
    /// the order given. Weight files of an earlier save that this one does not rewrite are deleted
    /// afterwards, so the folder never mixes two layouts once this returns.
    /// </summary>
    /// <param name="metadata">Stored in every shard; "format": "pt" is added when missing, because
    /// transformers refuses safetensors weights without it.</param>
    public static void Save(
        string dir,
        IEnumerable<KeyValuePair<string, Tensor>> tensors,
        long maxShardBytes = 5L << 30,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(dir);
        ArgumentNullException.ThrowIfNull(tensors);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);
        Directory.CreateDirectory(dir);

        var shardMetadata = new Dictionary<string, string>(StringComparer.Ordinal) { ["format"] = "pt" };
        if (metadata is not null)
        {
            foreach (var (k, v) in metadata) shardMetadata[k] = v;
        }

        var (shards, totalSize) = SplitIntoShards(tensors, maxShardBytes);
        if (shards.Count <= 1)
        {
            SafeTensors.Save(Path.Combine(dir, SingleFileName), shards.Count == 1 ? shards[0] : [], shardMetadata);
            RemoveStaleWeightFiles(dir, keep: [SingleFileName]);
            return;
        }

        var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
        var written = new HashSet<string>(StringComparer.Ordinal) { IndexFileName };
        for (int i = 0; i < shards.Count; i++)
        {
            string file = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            SafeTensors.Save(Path.Combine(dir, file), shards[i], shardMetadata);
            foreach (var (name, _) in shards[i]) weightMap[name] = file;
            written.Add(file);
        }
        WriteIndex(Path.Combine(dir, IndexFileName), totalSize, weightMap);
        RemoveStaleWeightFiles(dir, keep: written);
    }

    /// <summary>
    /// Loads every tensor of a weight folder: <c>model.safetensors</c> when present (transformers
    /// prefers it too), else the shards that <c>model.safetensors.index.json</c> names.
    /// </summary>
    public static Dictionary<string, Tensor> Load(string dir)
    {
        ArgumentNullException.ThrowIfNull(dir);
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"Weight folder {dir} does not exist.");

        string single = Path.Combine(dir, SingleFileName);
        string index = Path.Combine(dir, IndexFileName);
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            if (File.Exists(single))
            {
                using var file = SafeTensors.Open(single);
                foreach (var info in file.Tensors) result.Add(info.Name, file.Read(info.Name));
            }
            else if (File.Exists(index))
            {
                foreach (var (shard, names) in ReadIndex(index))
                {
                    using var file = SafeTensors.Open(Path.Combine(dir, shard));
                    foreach (string name in names)
                    {
                        if (!file.Contains(name))
                            throw new InvalidDataException($"{index} maps tensor '{name}' to {shard}, but {file.Path} does not contain it.");
                        result.Add(name, file.Read(name));
                    }
                }
            }
            else
            {
                throw new FileNotFoundException($"Weight folder {dir} holds neither {SingleFileName} nor {IndexFileName}.", single);
            }
            return result;
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
    }

    // ---- Sharding ----

    /// <summary>
    /// huggingface_hub's greedy split: walk tensors in order, start a new shard when the next one would
    /// push the current over the limit, and give a tensor bigger than the limit a shard of its own
    /// (appended at once, so it can precede the shard still being filled).
    /// </summary>
    private static (List<List<KeyValuePair<string, Tensor>>> Shards, long TotalSize) SplitIntoShards(
        IEnumerable<KeyValuePair<string, Tensor>> tensors, long maxShardBytes)
    {
        var shards = new List<List<KeyValuePair<string, Tensor>>>();
        var current = new List<KeyValuePair<string, Tensor>>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        long currentSize = 0, totalSize = 0;
        foreach (var kv in tensors)
        {
            if (!seen.Add(kv.Key)) throw new ArgumentException($"Tensor name '{kv.Key}' appears twice.");
            long size = checked(kv.Value.numel() * kv.Value.ElementSize);
            totalSize += size;
            if (size > maxShardBytes)
            {
                shards.Add([kv]);
                continue;
            }
            if (currentSize + size > maxShardBytes && current.Count > 0)
            {
                shards.Add(current);
                current = [];
                currentSize = 0;
            }
            current.Add(kv);
            currentSize += size;
        }
        if (current.Count > 0) shards.Add(current);
        return (shards, totalSize);
    }

    // ---- Index ----

    /// <summary>As transformers writes it: json.dumps(index, indent=2, sort_keys=True) plus a newline.</summary>
    private static void WriteIndex(string path, long totalSize, SortedDictionary<string, string> weightMap)
    {
        string temp = $"{path}.{Guid.NewGuid():N}.tmp";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
            {
                using (var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true, NewLine = "\n" }))
                {
                    json.WriteStartObject();
                    json.WriteStartObject("metadata");
                    json.WriteNumber("total_size", totalSize);
                    json.WriteEndObject();
                    json.WriteStartObject("weight_map");
                    foreach (var (name, file) in weightMap) json.WriteString(name, file);
                    json.WriteEndObject();
                    json.WriteEndObject();
                }
                stream.WriteByte((byte)'\n');
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    /// <summary>The index's weight_map grouped by shard, in first-seen order; every shard checked to exist.</summary>
    private static List<(string Shard, List<string> Names)> ReadIndex(string indexPath)
    {
        string dir = Path.GetDirectoryName(Path.GetFullPath(indexPath))!;
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(File.ReadAllBytes(indexPath));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{indexPath} is not valid JSON ({e.Message}).", e);
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object
                || !doc.RootElement.TryGetProperty("weight_map", out var map)
                || map.ValueKind != JsonValueKind.Object)
            {
                throw new InvalidDataException($"{indexPath} has no \"weight_map\" object mapping tensor names to shard files.");
            }

            var groups = new List<(string Shard, List<string> Names)>();
            var byShard = new Dictionary<string, List<string>>(StringComparer.Ordinal);
            foreach (var entry in map.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{indexPath} maps tensor '{entry.Name}' to a JSON {entry.Value.ValueKind}; expected a shard file name.");
                string shard = entry.Value.GetString()!;
                if (!byShard.TryGetValue(shard, out var names))
                {
                    // A bare file name only: an index must not reach outside its folder.
                    if (shard.Length == 0 || Path.GetFileName(shard) != shard || shard is "." or "..")
                        throw new InvalidDataException($"{indexPath} maps tensor '{entry.Name}' to '{shard}'; expected a file name in the same folder.");
                    if (!File.Exists(Path.Combine(dir, shard)))
                        throw new InvalidDataException($"{indexPath} maps tensor '{entry.Name}' to shard {shard}, but {Path.Combine(dir, shard)} does not exist.");
                    byShard[shard] = names = [];
                    groups.Add((shard, names));
                }
                names.Add(entry.Name);
            }
            return groups;
        }
    }

    // ---- Housekeeping ----

    [GeneratedRegex(@"^model-\d{5}-of-\d{5}\.safetensors$")]
    private static partial Regex ShardFileName();

    /// <summary>Deletes weight files from an earlier save with another layout, which a loader could otherwise pick up.</summary>
    private static void RemoveStaleWeightFiles(string dir, HashSet<string> keep)
    {
        foreach (string path in Directory.EnumerateFiles(dir))
        {
            string name = Path.GetFileName(path);
            bool weightFile = name is SingleFileName or IndexFileName || ShardFileName().IsMatch(name);
            if (weightFile && !keep.Contains(name)) File.Delete(path);
        }
    }
}
