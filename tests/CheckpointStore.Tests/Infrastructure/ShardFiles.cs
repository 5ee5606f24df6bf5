// Builds small safetensors files byte by byte (independently of the service's reader) and uploads them the way a rank would.
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using DeepSeekCluster.Contracts.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.CheckpointStore.Tests.Infrastructure;

/// <summary>A F32 tensor in a test file: its shape, its values, and where its bytes lie in the data section.</summary>
public sealed record TestTensor(string Name, long[] Shape, float[] Values)
{
    public byte[] Bytes => Values.SelectMany(BitConverter.GetBytes).ToArray();
}

public sealed record ShardFile(string FileName, byte[] Bytes, IReadOnlyList<TestTensor> Tensors)
{
    public string Sha256 => Convert.ToHexStringLower(SHA256.HashData(Bytes));

    /// <summary>XXH128 of each <paramref name="chunkBytes"/>-byte range, each hashed in one call (the store hashes as bytes arrive).</summary>
    public List<string> ChunkXxh128(long chunkBytes) =>
        Enumerable.Range(0, (int)((Bytes.Length + chunkBytes - 1) / chunkBytes))
            .Select(k => Convert.ToHexStringLower(System.IO.Hashing.XxHash128.Hash(Bytes.AsSpan((int)(k * chunkBytes), (int)Math.Min(chunkBytes, Bytes.Length - k * chunkBytes)))))
            .ToList();
    public ExpectedFile Expected => new() { FileName = FileName, Size = Bytes.Length, Sha256 = Sha256 };
}

public static class ShardFiles
{
    /// <summary>Tensors of distinct seeded values, so any misplaced byte shows.</summary>
    public static ShardFile Make(string fileName, int seed, params (string Name, long[] Shape)[] tensors)
    {
        var random = new Random(seed);
        var list = tensors.Select(t => new TestTensor(t.Name, t.Shape,
            Enumerable.Range(0, (int)t.Shape.Aggregate(1L, (a, b) => a * b)).Select(_ => (float)random.NextDouble()).ToArray())).ToList();

        var header = new Dictionary<string, object>();
        long offset = 0;
        foreach (var t in list)
        {
            long bytes = t.Values.Length * 4L;
            header[t.Name] = new { dtype = "F32", shape = t.Shape, data_offsets = new[] { offset, offset + bytes } };
            offset += bytes;
        }
        byte[] json = JsonSerializer.SerializeToUtf8Bytes(header);
        int padded = (json.Length + 7) / 8 * 8;
        var file = new MemoryStream();
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)padded);
        file.Write(prefix);
        file.Write(json);
        file.Write(Encoding.ASCII.GetBytes(new string(' ', padded - json.Length)));
        foreach (var t in list) file.Write(t.Bytes);
        return new ShardFile(fileName, file.ToArray(), list);
    }

    /// <summary>A rank file with one embedding-like matrix and one vector.</summary>
    public static ShardFile Rank(int rank, int seed, int rows = 64, int cols = 256) =>
        Make($"rank-{rank}.safetensors", seed,
            ($"model.layers.{rank}.mlp.gate_proj.weight", [rows, cols]),
            ($"optimizer.model.layers.{rank}.input_layernorm.weight.exp_avg", [cols]));

    /// <summary>
    /// Sends <paramref name="file"/> from <paramref name="from"/> in chunks; with <paramref name="stopAfter"/> the
    /// call is cancelled once that many bytes went out, as a dropped connection would.
    /// </summary>
    public static async Task<UploadShardReply?> UploadAsync(Store.CheckpointStoreClient client, string job, long step, int rank, ShardFile file,
        long from = 0, int chunk = 16 * 1024, long? stopAfter = null, string? sha256 = null, Func<Task>? beforeStop = null,
        (long Bytes, IEnumerable<string> Xxh128)? chunkHashes = null)
    {
        using var cancel = new CancellationTokenSource();
        using var call = client.UploadShard(cancellationToken: cancel.Token);
        try
        {
            var header = new UploadHeader { Job = job, Step = step, Rank = rank, FileName = file.FileName, TotalSize = file.Bytes.Length, Sha256 = sha256 ?? file.Sha256 };
            if (chunkHashes is { } announced)
            {
                header.ChunkBytes = announced.Bytes;
                header.ChunkXxh128.AddRange(announced.Xxh128);
            }
            await call.RequestStream.WriteAsync(new UploadShardMessage { Header = header });
            for (long at = from; at < file.Bytes.Length; at += chunk)
            {
                if (stopAfter is long stop && at - from >= stop)
                {
                    if (beforeStop is not null) await beforeStop();
                    cancel.Cancel();
                    return null;
                }
                int n = (int)Math.Min(chunk, file.Bytes.Length - at);
                await call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = at, Data = ByteString.CopyFrom(file.Bytes, (int)at, n) } });
            }
            await call.RequestStream.CompleteAsync();
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException && !cancel.IsCancellationRequested)
        {
            // The server ended the call while we were writing (a refusal): its own status is the response's.
        }
        return await call.ResponseAsync;
    }

    public static async Task CommitAsync(Store.CheckpointStoreClient client, string job, long step, long generation, params ShardFile[] files)
    {
        var request = new CommitCheckpointRequest { Job = job, Step = step, Generation = generation, ManifestJson = """{"layout":{"dp":1,"pp":1}}""" };
        request.Files.AddRange(files.Select(f => f.Expected));
        await client.CommitCheckpointAsync(request);
    }

    /// <summary>The description and the concatenated bytes of a DownloadTensor stream.</summary>
    public static async Task<(TensorDescription Description, byte[] Bytes)> DownloadAsync(Store.CheckpointStoreClient client, DownloadTensorRequest request)
    {
        using var call = client.DownloadTensor(request);
        TensorDescription? description = null;
        var bytes = new MemoryStream();
        await foreach (var chunk in call.ResponseStream.ReadAllAsync())
        {
            if (chunk.Description is not null) description = chunk.Description;
            chunk.Data.WriteTo(bytes);
        }
        return (description ?? throw new InvalidOperationException("DownloadTensor sent no description"), bytes.ToArray());
    }
}
