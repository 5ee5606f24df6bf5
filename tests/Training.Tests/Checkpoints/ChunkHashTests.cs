// Per-chunk hashes in the manifest (XXH128; SHA-256 in older manifests): written right, verified on several threads, any damaged chunk refused by name, old manifests still verified.
using DeepSeekCluster.Training.Parallel;
using System.IO.Hashing;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.Checkpoints;

namespace DeepSeekCluster.Training.Tests.Checkpoints;

public sealed class ChunkHashTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ckpt-chunks-").FullName;
    const string Job = "job-chunks";
    const long Step = 12;
    // Prime: chunk boundaries fall inside the header's neighbourhood, inside tensors and inside 4-byte elements.
    const long Chunk = 100_003;

    static CheckpointPosition Position => new(Step, 0, Step * 4, Step);

    static Task<CheckpointManifest> Save(FolderCheckpointStore store, TrainedState state, int dp, int pp) =>
        ShardedCheckpointWriter.SaveAllRanksAsync(store, Job, ParallelLayout.Even(dp, pp, TrainedState.Config.NumHiddenLayers),
            state.Tensors, Position, TrainedState.Config.ToJson(), tokenizerSha256: null);

    [Theory]
    [InlineData(1, 1)]
    [InlineData(2, 2)]
    public async Task EachFileRecordsTheHashOfEveryChunkAndAChunkedLoadEqualsTheSavedStateBitwise(int dp, int pp)
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job) { HashChunkBytes = Chunk };
        var manifest = await Save(store, saved, dp, pp);

        var committed = await store.ReadManifestAsync(Step); // what a loader sees: the JSON round trip
        Assert.Equal(dp * pp, committed.Files.Count);
        foreach (var f in committed.Files)
        {
            byte[] bytes = await File.ReadAllBytesAsync(Path.Combine(store.StepFolder(Step), f.Name));
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes)), f.Sha256);
            Assert.Equal(Chunk, f.ChunkBytes);
            Assert.True(bytes.Length > 3 * Chunk, $"{f.Name} is {bytes.Length} bytes: too small to spread over chunks");
            // An independent one-shot hash of each range (the writer appends incrementally, in whatever pieces it writes).
            var expected = Enumerable.Range(0, (int)((bytes.Length + Chunk - 1) / Chunk))
                .Select(k => Convert.ToHexStringLower(XxHash128.Hash(bytes.AsSpan((int)(k * Chunk), (int)Math.Min(Chunk, bytes.Length - k * Chunk)))));
            Assert.Equal(expected, f.ChunkXxh128!);
            Assert.Null(f.ChunkSha256);
        }

        using var target = new TrainedState(2, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer);
        var expectedState = saved.Tensors.ToDictionary();
        Assert.All(target.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(expectedState[kv.Key], kv.Value), kv.Key));
        Assert.Equal(Step, target.Optimizer.StepCount);
    }

    [Theory]
    [InlineData(ChunkHashAlgorithm.Xxh128)]
    [InlineData(ChunkHashAlgorithm.Sha256)] // what older writers recorded
    public async Task AFlippedByteInAnyChunkIsRefusedNamingTheFileAndTheChunk(ChunkHashAlgorithm algorithm)
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job) { HashChunkBytes = Chunk, HashChunkAlgorithm = algorithm };
        var manifest = await Save(store, saved, 1, 1);
        var file = manifest.Files[0];
        var recorded = file.ChunkHashes!;
        Assert.Equal(algorithm, recorded.Algorithm);
        Assert.Equal(algorithm == ChunkHashAlgorithm.Xxh128 ? file.ChunkXxh128 : file.ChunkSha256, recorded.Hashes);
        string victim = Path.Combine(store.StepFolder(Step), file.Name);
        int chunks = recorded.Hashes.Count;
        long headerEnd;
        using (var f = File.OpenRead(victim))
        {
            var len = new byte[8];
            f.ReadExactly(len);
            headerEnd = 8 + BitConverter.ToInt64(len);
        }
        Assert.True(headerEnd + 16 < Chunk, "the header fills the first chunk; the test needs tensor bytes in it");

        // The first chunk (just past the header), one in the middle, the last byte of the file.
        foreach (long at in new[] { headerEnd + 5, (chunks / 2) * Chunk + Chunk / 2, file.Size - 1 })
        {
            Flip(victim, at);
            using var target = new TrainedState(2, fill: false);
            var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer));
            long k = at / Chunk;
            Assert.Contains(victim, e.Message);
            Assert.Contains($"bytes [{k * Chunk}, {Math.Min((k + 1) * Chunk, file.Size)})", e.Message);
            Assert.Contains($"(chunk {k} of {chunks})", e.Message);
            Assert.Contains($"({recorded.Label}), the manifest says {recorded.Hashes[(int)k]}", e.Message);
            Assert.Contains("partial load", e.Message);
            Flip(victim, at); // restored: the next position is the only damage
        }

        using var intact = new TrainedState(3, fill: false);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, Step, intact.Model, intact.Optimizer); // the restored file loads
    }

    [Fact]
    public async Task AManifestWithoutChunkHashesIsVerifiedByTheWholeFileHash()
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job) { HashChunkBytes = Chunk };
        var manifest = await Save(store, saved, 1, 1);
        // Rewrite the committed manifest as an older writer would have left it: no chunk fields.
        string path = Path.Combine(store.StepFolder(Step), CheckpointManifest.FileName);
        var json = JsonNode.Parse(await File.ReadAllTextAsync(path))!;
        foreach (var f in json["files"]!.AsArray())
        {
            Assert.True(f!.AsObject().Remove("chunk_bytes") & f.AsObject().Remove("chunk_xxh128"));
        }
        await File.WriteAllTextAsync(path, json.ToJsonString());
        Assert.Null((await store.ReadManifestAsync(Step)).Files[0].ChunkHashes);

        using (var target = new TrainedState(2, fill: false))
        {
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Step, target.Model, target.Optimizer);
            var expected = saved.Tensors.ToDictionary();
            Assert.All(target.Tensors, kv => Assert.True(TrainedState.BitwiseEqual(expected[kv.Key], kv.Value), kv.Key));
        }

        string victim = Path.Combine(store.StepFolder(Step), manifest.Files[0].Name);
        Flip(victim, 2 * Chunk + 3);
        using var damaged = new TrainedState(3, fill: false);
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, Step, damaged.Model, damaged.Optimizer));
        Assert.Contains(victim, e.Message);
        Assert.Contains($"the manifest says {manifest.Files[0].Sha256}", e.Message);
    }

    [Theory]
    [InlineData("drop chunk_bytes", "needs both chunk_bytes (at least 1) and chunk hashes (chunk_xxh128 or chunk_sha256), or neither")]
    [InlineData("zero chunk_bytes", "needs both chunk_bytes (at least 1) and chunk hashes (chunk_xxh128 or chunk_sha256), or neither")]
    [InlineData("drop a hash", "chunk hashes; the manifest lists")]
    [InlineData("upper-case hash", "expected 32 lower-case hex digits")]
    [InlineData("SHA-256 length", "expected 32 lower-case hex digits")]
    public async Task AManifestWithIncompleteOrMalformedChunkHashesIsRefusedNamingTheFile(string damage, string expected)
    {
        using var saved = new TrainedState(1);
        using var store = new FolderCheckpointStore(root, Job) { HashChunkBytes = Chunk };
        await Save(store, saved, 2, 1);
        string path = Path.Combine(store.StepFolder(Step), CheckpointManifest.FileName);
        var json = JsonNode.Parse(await File.ReadAllTextAsync(path))!;
        var file = json["files"]![1]!.AsObject();
        var hashes = file["chunk_xxh128"]!.AsArray();
        switch (damage)
        {
            case "drop chunk_bytes": file.Remove("chunk_bytes"); break;
            case "zero chunk_bytes": file["chunk_bytes"] = 0; break;
            case "drop a hash": hashes.RemoveAt(hashes.Count - 1); break;
            case "upper-case hash": hashes[1] = hashes[1]!.GetValue<string>().ToUpperInvariant(); break;
            case "SHA-256 length": hashes[1] = new string('a', 64); break;
        }
        await File.WriteAllTextAsync(path, json.ToJsonString());

        var e = await Assert.ThrowsAsync<InvalidDataException>(() => store.ReadManifestAsync(Step));
        Assert.Contains(path, e.Message);
        Assert.Contains("'rank-1.safetensors'", e.Message);
        Assert.Contains(expected, e.Message);
    }

    static void Flip(string path, long at)
    {
        using var f = new FileStream(path, FileMode.Open);
        f.Position = at;
        int b = f.ReadByte();
        f.Position = at;
        f.WriteByte((byte)(b ^ 0x10));
    }

    public void Dispose() => Directory.Delete(root, true);
}
