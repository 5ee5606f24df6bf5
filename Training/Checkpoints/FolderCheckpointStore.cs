// The local-folder checkpoint backend: {root}/{job}/{step:D8}/rank-{r}.safetensors + manifest.json, manifest last.
using DeepSeekCluster.Training.IO;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// Ranks write straight into the step folder (nothing to publish); <see cref="CommitAsync"/> checks each listed file's
/// size and writes manifest.json through a temporary file and a rename, so a step folder without a manifest is an
/// unfinished save that readers ignore. The writers' SHA-256s are recorded, not recomputed: on a shared file system
/// the bytes never travelled. A replica load (<see cref="ReadStepIntoAsync"/>) checks them while it reads anyway (the
/// chunk hashes where present), and <see cref="VerifyAsync"/> rehashes whole files on demand.
/// </summary>
public sealed class FolderCheckpointStore(string root, string job) : ICheckpointSink, ICheckpointDirectSource, IDisposable
{
    public string StepFolder(long step) => Path.Combine(root, job, $"{step:D8}");
    readonly Dictionary<string, SafeTensorsFile> open = new(StringComparer.Ordinal);
    readonly Lock gate = new();

    /// <summary>
    /// Rank files written into this store record a SHA-256 per chunk of this many bytes (null: none), which lets
    /// <see cref="ReadStepIntoAsync"/> verify one file on several cores; 32 MiB by default.
    /// </summary>
    public long? HashChunkBytes { get; init; } = ManifestFile.DefaultChunkBytes;

    /// <summary>XXH128 per chunk; SHA-256 writes the chunk hashes older writers recorded (to compare with them).</summary>
    public ChunkHashAlgorithm HashChunkAlgorithm { get; init; } = ChunkHashAlgorithm.Xxh128;

    public string LocalPath(long step, int rank) => Path.Combine(StepFolder(step), ShardingPlan.FileOf(rank));

    public Task<ManifestFile> PublishAsync(long step, int rank, ManifestFile written, CancellationToken ct = default) => Task.FromResult(written);

    public Task CommitAsync(CheckpointManifest manifest, CancellationToken ct = default)
    {
        if (manifest.Job != job) throw new ArgumentException($"the manifest is for job '{manifest.Job}', this store holds job '{job}'");
        string dir = StepFolder(manifest.Step), path = Path.Combine(dir, CheckpointManifest.FileName);
        if (File.Exists(path))
            throw new InvalidOperationException($"step {manifest.Step} of job '{job}' is already committed ({path}); a second writer cannot replace it");
        foreach (var f in manifest.Files)
        {
            var info = new FileInfo(Path.Combine(dir, f.Name));
            if (!info.Exists) throw new InvalidOperationException($"step {manifest.Step} cannot be committed: {f.Name} is missing from {dir}");
            if (info.Length != f.Size) throw new InvalidOperationException($"step {manifest.Step} cannot be committed: {f.Name} is {info.Length} bytes, expected {f.Size}");
        }
        var committed = manifest with { CommittedUtc = DateTime.UtcNow.ToString("O") };
        string temp = path + $".{Guid.NewGuid():N}.tmp";
        using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
        {
            stream.Write(System.Text.Encoding.UTF8.GetBytes(committed.ToJson()));
            stream.Flush(flushToDisk: true);
        }
        // No overwrite: of two racing committers exactly one rename succeeds.
        try { File.Move(temp, path, overwrite: false); }
        catch (IOException) { File.Delete(temp); throw new InvalidOperationException($"step {manifest.Step} of job '{job}' was committed by another writer meanwhile"); }
        return Task.CompletedTask;
    }

    public Task<IReadOnlyList<long>> ListStepsAsync(CancellationToken ct = default)
    {
        string dir = Path.Combine(root, job);
        IReadOnlyList<long> steps = !Directory.Exists(dir) ? [] : Directory.GetDirectories(dir)
            .Where(d => File.Exists(Path.Combine(d, CheckpointManifest.FileName)))
            .Select(d => long.TryParse(Path.GetFileName(d), out long s) ? s : -1).Where(s => s >= 0).Order().ToList();
        return Task.FromResult(steps);
    }

    public async Task<CheckpointManifest> ReadManifestAsync(long step, CancellationToken ct = default)
    {
        string path = Path.Combine(StepFolder(step), CheckpointManifest.FileName);
        if (!File.Exists(path)) throw new FileNotFoundException($"step {step} of job '{job}' is not committed: {path} does not exist", path);
        return CheckpointManifest.FromJson(await File.ReadAllTextAsync(path, ct), path);
    }

    public Task<Tensor> ReadAsync(long step, string file, string tensor, (long Start, long Count)? rows, CancellationToken ct = default)
    {
        if (Path.GetFileName(file) != file) throw new InvalidDataException($"checkpoint file name '{file}' is not a bare file name");
        string path = Path.Combine(StepFolder(step), file);
        SafeTensorsFile st;
        lock (gate)
        {
            if (!open.TryGetValue(path, out st!)) open[path] = st = SafeTensors.Open(path);
        }
        return Task.FromResult(rows is { } r ? st.ReadRows(tensor, r.Start, r.Count) : st.Read(tensor));
    }

    public Task ReadStepIntoAsync(CheckpointManifest manifest, IReadOnlyDictionary<string, Tensor> destinations, CancellationToken ct = default)
    {
        if (manifest.Job != job) throw new ArgumentException($"the manifest is for job '{manifest.Job}', this store holds job '{job}'", nameof(manifest));
        return DirectStepReader.ReadAsync(StepFolder(manifest.Step), manifest, destinations, ct);
    }

    /// <summary>Rehashes every file of a committed step against its manifest; the first mismatch names the file.</summary>
    public async Task VerifyAsync(long step, CancellationToken ct = default)
    {
        var manifest = await ReadManifestAsync(step, ct);
        foreach (var f in manifest.Files)
        {
            await using var stream = File.OpenRead(Path.Combine(StepFolder(step), f.Name));
            string actual = Convert.ToHexStringLower(await System.Security.Cryptography.SHA256.HashDataAsync(stream, ct));
            if (actual != f.Sha256 || stream.Length != f.Size)
                throw new InvalidDataException($"{f.Name} of step {step}: {stream.Length} bytes hashing to {actual}; the manifest says {f.Size} bytes, {f.Sha256}");
        }
    }

    public void Dispose()
    {
        lock (gate)
        {
            foreach (var f in open.Values) f.Dispose();
            open.Clear();
        }
    }
}
