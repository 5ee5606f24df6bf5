// Exports a committed checkpoint (any layout) or an HF folder to hf / hf-bf16 / gguf-* / onnx under exports/{job}/{step}/{format}/, with a manifest of hashes.
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Serialization;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Export;

public sealed record ExportedFile(
    [property: JsonPropertyName("path")] string Path,
    [property: JsonPropertyName("bytes")] long Bytes,
    [property: JsonPropertyName("sha256")] string Sha256);

/// <summary>export.json: what an export folder holds and where it came from; written last, so a folder without it is not an export.</summary>
public sealed record ExportManifest
{
    public const string FileName = "export.json";
    [JsonPropertyName("format")] public required string Format { get; init; }
    [JsonPropertyName("job")] public required string Job { get; init; }
    [JsonPropertyName("step")] public required long Step { get; init; }
    [JsonPropertyName("source")] public required string Source { get; init; }
    [JsonPropertyName("tokenizer_sha256")] public string? TokenizerSha256 { get; init; }
    [JsonPropertyName("created_utc")] public DateTimeOffset CreatedUtc { get; init; }
    [JsonPropertyName("files")] public required IReadOnlyList<ExportedFile> Files { get; init; }

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true };
    public string ToJson() => JsonSerializer.Serialize(this, Json);
    public static ExportManifest Load(string path) =>
        JsonSerializer.Deserialize<ExportManifest>(File.ReadAllText(path)) ?? throw new InvalidDataException($"{path}: empty export manifest");
}

public static class ModelExport
{
    /// <summary>The format names the CLI, the REST call and the store's folder use.</summary>
    public static readonly IReadOnlyList<string> Formats = ["hf", "hf-bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "onnx"];

    public static string CheckFormat(string format) => Formats.Contains(format)
        ? format
        : throw new ArgumentException($"unknown export format '{format}': expected one of {string.Join(", ", Formats)}");

    /// <summary>exports/{job}/{step:D8}/{format} under a store's root.</summary>
    public static string FolderOf(string exportsRoot, string job, long step, string format) =>
        Path.Combine(exportsRoot, job, $"{step:D8}", CheckFormat(format));

    /// <summary>
    /// Loads committed <paramref name="step"/> (the newest when null) of a checkpoint of any layout into one whole model,
    /// checking every file's hash as it reads, and exports it into <paramref name="exportsRoot"/>. The tokenizer must be
    /// the one the checkpoint was saved with (its SHA-256 is in the checkpoint's manifest).
    /// </summary>
    public static async Task<(string Folder, ExportManifest Manifest)> FromCheckpointAsync(ICheckpointSource source, long? step, BpeTokenizer tokenizer,
        string format, string exportsRoot, CancellationToken ct = default)
    {
        CheckFormat(format);
        var steps = await source.ListStepsAsync(ct);
        long chosen = step ?? (steps.Count > 0 ? steps[^1] : throw new InvalidDataException("the checkpoint store has no committed step to export"));
        if (!steps.Contains(chosen))
            throw new InvalidDataException($"step {chosen} is not committed; committed steps: {(steps.Count == 0 ? "none" : string.Join(", ", steps))}");
        var manifest = await source.ReadManifestAsync(chosen, ct);
        string label = $"step {chosen} of job '{manifest.Job}'";
        var config = manifest.Config is { } json
            ? DeepSeekConfig.FromJson(json.GetRawText(), $"the config.json of {label}").Validated()
            : throw new InvalidDataException($"{label}: its manifest has no config.json, so there is no model shape to export");
        using var model = new DeepSeekForCausalLM(config);
        await ShardedCheckpointLoader.LoadReplicaAsync(source, chosen, model, null, tokenizer.Hash, ct);
        model.eval();
        var folder = FolderOf(exportsRoot, manifest.Job, chosen, format);
        return (folder, Write(model, tokenizer, format, folder, manifest.Job, chosen, $"checkpoint {label}"));
    }

    /// <summary>Exports an HF model folder (config.json, weights, tokenizer.json) into <paramref name="folder"/>.</summary>
    public static ExportManifest FromModelFolder(string modelFolder, string format, string folder)
    {
        CheckFormat(format);
        var loaded = HfModelFolder.Load(modelFolder);
        using var model = loaded.Model;
        var tokenizer = loaded.Tokenizer ?? throw new InvalidDataException($"{modelFolder}: no {HfModelFolder.TokenizerFile}; every export format carries the tokenizer");
        return Write(model, tokenizer, format, folder, Path.GetFileName(Path.TrimEndingDirectorySeparator(modelFolder)), 0, $"model folder {Path.GetFullPath(modelFolder)}");
    }

    /// <summary>
    /// Writes the export into a hidden staging folder beside <paramref name="folder"/>, hashes it, writes export.json last
    /// and renames the staging folder into place: a failure leaves no folder behind, and an existing export is never
    /// overwritten (exports of a committed step are immutable, like the step).
    /// </summary>
    public static ExportManifest Write(DeepSeekForCausalLM model, BpeTokenizer tokenizer, string format, string folder, string job, long step, string source)
    {
        CheckFormat(format);
        if (Directory.Exists(folder)) throw new IOException($"export '{folder}' already exists; exports of a committed step are not overwritten");
        var parent = Path.GetDirectoryName(Path.GetFullPath(folder))!;
        Directory.CreateDirectory(parent);
        var staging = Path.Combine(parent, $".{Path.GetFileName(folder)}.partial-{Guid.NewGuid():N}");
        Directory.CreateDirectory(staging);
        try
        {
            WriteFormat(model, tokenizer, format, staging);
            var manifest = Describe(staging, format, job, step, source, tokenizer.Hash);
            File.WriteAllText(Path.Combine(staging, ExportManifest.FileName), manifest.ToJson());
            Directory.Move(staging, folder);
            return manifest;
        }
        catch
        {
            Directory.Delete(staging, recursive: true);
            throw;
        }
    }

    /// <summary>The manifest of the files in <paramref name="folder"/> (sizes and SHA-256s, export.json excepted).</summary>
    public static ExportManifest Describe(string folder, string format, string job, long step, string source, string? tokenizerSha256) => new()
    {
        Format = CheckFormat(format), Job = job, Step = step, Source = source, TokenizerSha256 = tokenizerSha256, CreatedUtc = DateTimeOffset.UtcNow,
        Files = Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories)
            .Select(f => new ExportedFile(Path.GetRelativePath(folder, f).Replace('\\', '/'), new FileInfo(f).Length, Sha256(f)))
            .Where(f => f.Path != ExportManifest.FileName)
            .OrderBy(f => f.Path, StringComparer.Ordinal).ToList(),
    };

    static void WriteFormat(DeepSeekForCausalLM model, BpeTokenizer tokenizer, string format, string dir)
    {
        switch (format)
        {
            case "hf":
                HfModelFolder.Save(dir, model, tokenizer);
                break;
            case "hf-bf16":
                // A bf16 copy: the caller's model keeps its precision.
                using (var copy = new DeepSeekForCausalLM(model.Config))
                {
                    using (no_grad()) copy.load_state_dict(model.state_dict());
                    copy.to(ScalarType.BFloat16);
                    HfModelFolder.Save(dir, copy, tokenizer);
                }
                break;
            case "onnx":
                // Two graphs: the whole sequence at once, and a decode step over the latent cache.
                Onnx.OnnxExporter.Write(model, Path.Combine(dir, "model.onnx"));
                Onnx.OnnxExporter.Write(model, Path.Combine(dir, "decode.onnx"), withCache: true);
                tokenizer.Save(Path.Combine(dir, HfModelFolder.TokenizerFile));
                File.WriteAllText(Path.Combine(dir, HfModelFolder.ConfigFile), model.Config.ToJson());
                break;
            default:
                var type = format switch { "gguf-f16" => GgufType.F16, "gguf-q8_0" => GgufType.Q8_0, _ => GgufType.Q4_0 };
                GgufExporter.Write(model, tokenizer, Path.Combine(dir, "model.gguf"), type);
                break;
        }
    }

    /// <summary>Checks every file an export's manifest lists against its size and SHA-256; throws naming the first that differs.</summary>
    public static ExportManifest Verify(string folder)
    {
        var path = Path.Combine(folder, ExportManifest.FileName);
        if (!File.Exists(path)) throw new InvalidDataException($"'{folder}' has no {ExportManifest.FileName}: not a finished export");
        var manifest = ExportManifest.Load(path);
        foreach (var f in manifest.Files)
        {
            var file = Path.Combine(folder, f.Path);
            if (!File.Exists(file)) throw new InvalidDataException($"{file}: listed in {ExportManifest.FileName} but missing");
            if (new FileInfo(file).Length != f.Bytes || Sha256(file) != f.Sha256)
                throw new InvalidDataException($"{file}: its size or SHA-256 differs from {ExportManifest.FileName}");
        }
        return manifest;
    }

    static string Sha256(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }
}
