// Where ranks put their checkpoint files and where the coordinator commits the manifest; where loaders read them back.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// Two-phase save: each rank writes its file at <see cref="LocalPath"/> and calls <see cref="PublishAsync"/>; then one
/// caller (the coordinator, or a single-process run itself) calls <see cref="CommitAsync"/>, which checks every file
/// and writes the manifest last.
/// </summary>
public interface ICheckpointSink
{
    /// <summary>The local file a rank writes its slices into (the final place for a folder, a staging file for a remote store).</summary>
    string LocalPath(long step, int rank);
    /// <summary>Makes the written file part of the uncommitted step (uploads it, for a remote store); returns what was stored.</summary>
    Task<ManifestFile> PublishAsync(long step, int rank, ManifestFile written, CancellationToken ct = default);
    /// <summary>Checks the manifest's files are stored as reported and writes the manifest; the step exists from then on.</summary>
    Task CommitAsync(CheckpointManifest manifest, CancellationToken ct = default);
    /// <summary>
    /// Bytes per chunk hash a writer records beside each file's SHA-256 (<see cref="ManifestFile.ChunkXxh128"/>), or null
    /// for none. Only a store that keeps them in its manifest and verifies by chunk is worth the save's extra hashing.
    /// </summary>
    long? HashChunkBytes => null;
    /// <summary>The chunk hash a writer records: XXH128; SHA-256 only to write what older writers did (the benchmark's baseline).</summary>
    ChunkHashAlgorithm HashChunkAlgorithm => ChunkHashAlgorithm.Xxh128;
}

/// <summary>Committed checkpoints, read by manifest, tensor and row range.</summary>
public interface ICheckpointSource
{
    /// <summary>Committed steps, ascending.</summary>
    Task<IReadOnlyList<long>> ListStepsAsync(CancellationToken ct = default);
    Task<CheckpointManifest> ReadManifestAsync(long step, CancellationToken ct = default);
    /// <summary>
    /// Rows [start, start + count) of the slice of <paramref name="tensor"/> stored in <paramref name="file"/> (rows counted
    /// from the slice's first row), or the whole stored tensor when <paramref name="rows"/> is null; a new CPU tensor.
    /// </summary>
    Task<Tensor> ReadAsync(long step, string file, string tensor, (long Start, long Count)? rows, CancellationToken ct = default);
}
