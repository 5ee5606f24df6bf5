// Chunk hashes through the store, against the folder backend and real Azurite: verified on upload (fresh and resumed),
// recorded in the manifest at commit, checked on every download; a damaged stored byte is refused by file, chunk and range.
using System.Text.Json.Nodes;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.CheckpointStore.Tests.Infrastructure;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using static DeepSeekCluster.CheckpointStore.Tests.Infrastructure.ShardFiles;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class FolderChunkHashTests(FolderBackendFixture fixture) : ChunkHashBehaviour(fixture), IClassFixture<FolderBackendFixture>;

public sealed class AzuriteChunkHashTests(AzuriteBackendFixture fixture) : ChunkHashBehaviour(fixture), IClassFixture<AzuriteBackendFixture>;

public abstract class ChunkHashBehaviour(BackendFixture fixture)
{
    private Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient Client => fixture.Host.Client;
    private IBlobBackend Blobs => fixture.Host.Services.GetRequiredService<IBlobBackend>();
    private static string NewJob() => $"job-{Guid.NewGuid():N}"[..20];
    // Not a power of two: chunk boundaries fall inside the header and inside 4-byte elements.
    private const long Chunk = 4099;

    private static ShardFile File() => Rank(0, seed: 11, rows: 40, cols: 100); // ~16 KB of matrix: 4 chunks and a short fifth

    private async Task<(List<string> Hashes, long Bytes)> ManifestChunksAsync(string job, long step, string fileName)
    {
        var manifest = JsonNode.Parse((await Client.GetManifestAsync(new GetManifestRequest { Job = job, Step = step })).ManifestJson)!;
        var entry = manifest["files"]!.AsArray().Single(f => f!["name"]!.GetValue<string>() == fileName)!;
        return (entry["chunk_xxh128"]!.AsArray().Select(h => h!.GetValue<string>()).ToList(), entry["chunk_bytes"]!.GetValue<long>());
    }

    /// <summary>Flips one bit of a stored blob behind the store's back (as bit rot would), keeping its metadata.</summary>
    private async Task FlipStoredByteAsync(string key, long at)
    {
        var info = await Blobs.GetInfoAsync(key, default) ?? throw new InvalidOperationException($"{key} is not stored");
        var bytes = new byte[info.Size];
        await Blobs.ReadAsync(key, 0, bytes, default);
        bytes[at] ^= 0x10;
        await Blobs.PutAsync(key, bytes, info.Metadata, onlyIfAbsent: false, default);
    }

    [Fact]
    public async Task AnnouncedChunkHashesAreVerifiedRecordedInTheManifestAndAFlippedStoredByteIsRefusedNamingFileChunkAndRange()
    {
        string job = NewJob();
        var file = File();
        var hashes = file.ChunkXxh128(Chunk);
        Assert.True(hashes.Count >= 4, $"{file.Bytes.Length} bytes give only {hashes.Count} chunks");
        var reply = await UploadAsync(Client, job, 7, 0, file, chunk: 3000, chunkHashes: (Chunk, hashes));
        Assert.Equal(Chunk, reply!.ChunkBytes);
        Assert.Equal(hashes, reply.ChunkXxh128);

        await CommitAsync(Client, job, 7, 1, file); // the committer names no chunk hashes (as the Coordinator): the store's go in
        var (recorded, bytes) = await ManifestChunksAsync(job, 7, file.FileName);
        Assert.Equal(Chunk, bytes);
        Assert.Equal(hashes, recorded);

        // A byte of the matrix in chunk 2, flipped in storage before anything was downloaded.
        var matrix = file.Tensors[0];
        const int k = 2;
        long at = k * Chunk + 17;
        await FlipStoredByteAsync($"{job}/00000007/{file.FileName}", at);
        var e = await Assert.ThrowsAsync<RpcException>(() => DownloadAsync(Client, new DownloadTensorRequest { Job = job, Step = 7, TensorName = matrix.Name }));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains(file.FileName, e.Status.Detail);
        Assert.Contains($"bytes [{k * Chunk}, {(k + 1) * Chunk}) (chunk {k} of {hashes.Count})", e.Status.Detail);
        Assert.Contains($"the manifest says {hashes[k]}", e.Status.Detail);
        // A row range that does not touch chunk 2 is still served, verified by its own chunks.
        var (_, firstRows) = await DownloadAsync(Client, new DownloadTensorRequest
        {
            Job = job, Step = 7, TensorName = matrix.Name, FileName = file.FileName, HasRows = true, RowStart = 0, RowCount = 5,
        });
        Assert.Equal(matrix.Bytes.AsSpan(0, 5 * 100 * 4).ToArray(), firstRows);

        await FlipStoredByteAsync($"{job}/00000007/{file.FileName}", at); // repaired: every tensor downloads bitwise
        foreach (var t in file.Tensors)
            Assert.Equal(t.Bytes, (await DownloadAsync(Client, new DownloadTensorRequest { Job = job, Step = 7, TensorName = t.Name })).Bytes);
    }

    [Fact]
    public async Task AnUploadWhoseAnnouncedChunkHashDiffersFromTheBytesIsDiscardedNamingTheChunk()
    {
        string job = NewJob();
        var file = File();
        var hashes = file.ChunkXxh128(Chunk);
        hashes[3] = hashes[1]; // well-formed, but another chunk's
        var e = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 3, 0, file, chunkHashes: (Chunk, hashes)));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains($"{file.FileName}: bytes [{3 * Chunk}, {4 * Chunk}) (chunk 3 of {hashes.Count}) received hash to {file.ChunkXxh128(Chunk)[3]} (XXH128), not the announced {hashes[3]}", e.Status.Detail);
        var status = await Client.GetUploadStatusAsync(new UploadStatusRequest { Job = job, Step = 3, FileName = file.FileName, Sha256 = file.Sha256 });
        Assert.False(status.Complete);
        Assert.Equal(0, status.ReceivedBytes);
        Assert.Null(await Blobs.GetInfoAsync($"{job}/00000003/{file.FileName}", default));
    }

    [Fact]
    public async Task AResumedUploadIsVerifiedByChunkFromTheStoredBytes()
    {
        string job = NewJob();
        var file = Rank(0, seed: 12, rows: 256, cols: 256); // 256 KiB: four of the tests' 64 KiB staging blocks
        var hashes = file.ChunkXxh128(Chunk);
        var status = new UploadStatusRequest { Job = job, Step = 4, FileName = file.FileName, Sha256 = file.Sha256 };
        // Dropped once the store has staged a block, so the rest arrives in a second stream and the store hashes the
        // whole file by reading it back (the path of a resumed upload) rather than as the bytes arrive.
        await UploadAsync(Client, job, 4, 0, file, stopAfter: file.Bytes.Length / 2, chunkHashes: (Chunk, hashes), beforeStop: () => fixture.Host.WaitUntilStagedAsync(status));
        long from = await fixture.Host.ReceivedAfterDropAsync(status);
        Assert.InRange(from, 1, file.Bytes.Length / 2);

        var wrong = hashes.ToList();
        wrong[^1] = hashes[0];
        var e = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 4, 0, file, from: from, chunkHashes: (Chunk, wrong)));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains($"(chunk {hashes.Count - 1} of {hashes.Count}) stored hash to {hashes[^1]} (XXH128)", e.Status.Detail);
        Assert.Equal(0, (await Client.GetUploadStatusAsync(status)).ReceivedBytes); // discarded

        // Again, right: dropped and resumed the same way, then recorded and committed.
        await UploadAsync(Client, job, 4, 0, file, stopAfter: file.Bytes.Length / 2, chunkHashes: (Chunk, hashes), beforeStop: () => fixture.Host.WaitUntilStagedAsync(status));
        from = await fixture.Host.ReceivedAfterDropAsync(status);
        var reply = await UploadAsync(Client, job, 4, 0, file, from: from, chunkHashes: (Chunk, hashes));
        Assert.Equal(hashes, reply!.ChunkXxh128);
        await CommitAsync(Client, job, 4, 1, file);
        Assert.Equal(hashes, (await ManifestChunksAsync(job, 4, file.FileName)).Hashes);
    }

    [Fact]
    public async Task AnUploadWithoutChunkHashesGetsTheStoresOwnAndACommitNamingOtherChunkHashesIsRefused()
    {
        string job = NewJob();
        var file = File();
        var reply = await UploadAsync(Client, job, 5, 0, file);
        Assert.Equal(32L << 20, reply!.ChunkBytes); // the trainer's default chunk: one chunk for this small file
        Assert.Equal(file.ChunkXxh128(32L << 20), reply.ChunkXxh128);

        var request = new CommitCheckpointRequest { Job = job, Step = 5, Generation = 1, ManifestJson = """{"layout":{"dp":1,"pp":1}}""" };
        var expected = file.Expected;
        expected.ChunkBytes = Chunk;
        expected.ChunkXxh128.AddRange(file.ChunkXxh128(Chunk));
        request.Files.Add(expected);
        var e = await Assert.ThrowsAsync<RpcException>(() => Client.CommitCheckpointAsync(request).ResponseAsync);
        Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
        Assert.Contains($"the chunk hashes of {file.FileName} are not those the store verified", e.Status.Detail);
        Assert.Empty((await Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job })).Checkpoints);

        var malformed = request.Clone();
        malformed.Files[0].ChunkXxh128[0] = "XYZ";
        var bad = await Assert.ThrowsAsync<RpcException>(() => Client.CommitCheckpointAsync(malformed).ResponseAsync);
        Assert.Equal(StatusCode.InvalidArgument, bad.StatusCode);
        Assert.Contains("chunk 0", bad.Status.Detail);

        await CommitAsync(Client, job, 5, 1, file);
        Assert.Equal(file.ChunkXxh128(32L << 20), (await ManifestChunksAsync(job, 5, file.FileName)).Hashes);
    }

    [Fact]
    public async Task AStoredFileUploadedAgainWithOtherChunkHashesIsRehashedFromStorageAndAWrongAnnouncementLeavesItStored()
    {
        string job = NewJob();
        var file = File();
        await UploadAsync(Client, job, 6, 0, file); // stored with the store's own 32 MiB list
        var wrong = file.ChunkXxh128(Chunk);
        wrong[1] = wrong[0];
        var e = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 6, 0, file, chunkHashes: (Chunk, wrong)));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains($"bytes [{Chunk}, {2 * Chunk}) (chunk 1 of {wrong.Count}) stored hash to", e.Status.Detail);
        Assert.Contains("the stored file is kept", e.Status.Detail);
        var status = await Client.GetUploadStatusAsync(new UploadStatusRequest { Job = job, Step = 6, FileName = file.FileName, Sha256 = file.Sha256 });
        Assert.True(status.Complete);

        var reply = await UploadAsync(Client, job, 6, 0, file, chunkHashes: (Chunk, file.ChunkXxh128(Chunk)));
        Assert.Equal(file.ChunkXxh128(Chunk), reply!.ChunkXxh128);
        await CommitAsync(Client, job, 6, 1, file);
        var (hashes, bytes) = await ManifestChunksAsync(job, 6, file.FileName);
        Assert.Equal(Chunk, bytes);
        Assert.Equal(file.ChunkXxh128(Chunk), hashes);
    }
}
