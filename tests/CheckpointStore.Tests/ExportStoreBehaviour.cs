// The ExportStore service against the folder backend and real Azurite: upload, commit with export.json last, list, checked download.
using System.Security.Cryptography;
using System.Text.Json;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.CheckpointStore.Tests.Infrastructure;
using DeepSeekCluster.Contracts.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class FolderBackendExportTests(FolderBackendFixture fixture) : ExportStoreBehaviour(fixture), IClassFixture<FolderBackendFixture>;

public sealed class AzuriteBackendExportTests(AzuriteBackendFixture fixture) : ExportStoreBehaviour(fixture), IClassFixture<AzuriteBackendFixture>;

public abstract class ExportStoreBehaviour(BackendFixture fixture)
{
    private ExportStore.ExportStoreClient Client => new(fixture.Host.Channel);
    private static ExportKey NewExport(string format = "gguf-q8_0") => new() { Job = $"job-{Guid.NewGuid():N}"[..20], Step = 40, Format = format };

    private static (string Path, byte[] Bytes) File(string path, int size, int seed)
    {
        var bytes = new byte[size];
        new Random(seed).NextBytes(bytes);
        return (path, bytes);
    }

    private static string Sha(byte[] b) => Convert.ToHexStringLower(SHA256.HashData(b));

    private static string Manifest(ExportKey key, params (string Path, byte[] Bytes)[] files) => JsonSerializer.Serialize(new
    {
        format = key.Format, job = key.Job, step = key.Step, source = "test",
        files = files.Select(f => new { path = f.Path, bytes = f.Bytes.LongLength, sha256 = Sha(f.Bytes) }),
    });

    private async Task UploadAsync(ExportKey key, (string Path, byte[] Bytes) file, string? sha = null)
    {
        using var call = Client.UploadExportFile();
        try
        {
            await call.RequestStream.WriteAsync(new UploadExportFileMessage
            {
                Header = new ExportFileHeader { Export = key, Path = file.Path, TotalSize = file.Bytes.Length, Sha256 = sha ?? Sha(file.Bytes) },
            });
            for (int at = 0; at < file.Bytes.Length; at += 100_000)
                await call.RequestStream.WriteAsync(new UploadExportFileMessage { Data = ByteString.CopyFrom(file.Bytes, at, Math.Min(100_000, file.Bytes.Length - at)) });
            await call.RequestStream.CompleteAsync();
        }
        catch (RpcException) { } // the store ended the call early (a refused header): its status is the response's
        await call;
    }

    private async Task<byte[]> DownloadAsync(ExportKey key, string path)
    {
        using var call = Client.DownloadExportFile(new DownloadExportFileRequest { Export = key, Path = path });
        var result = new MemoryStream();
        await foreach (var chunk in call.ResponseStream.ReadAllAsync()) chunk.Data.WriteTo(result);
        return result.ToArray();
    }

    private async Task<IReadOnlyList<BlobEntry>> BlobsOfAsync(ExportKey key) =>
        await fixture.Host.Services.GetRequiredService<IBlobBackend>()
            .ListAsync($"exports/{key.Job}/{key.Step:D8}/{key.Format}/", includeStaged: true, CancellationToken.None);

    [Fact]
    public async Task UploadCommitListDownloadRoundTripIsBitwise()
    {
        var key = NewExport();
        var gguf = File("model.gguf", 300_000, 1);
        var nested = File("tokenizer/tokenizer.json", 1_000, 2);
        await UploadAsync(key, gguf);
        await UploadAsync(key, nested);
        Assert.Empty((await Client.ListExportsAsync(new ListExportsRequest { Job = key.Job })).Exports); // not committed: invisible
        await Assert.ThrowsAsync<RpcException>(() => DownloadAsync(key, "model.gguf"));

        var reply = await Client.CommitExportAsync(new CommitExportRequest { Export = key, ManifestJson = Manifest(key, gguf, nested) });
        Assert.Equal($"exports/{key.Job}/00000040/gguf-q8_0/export.json", reply.ManifestKey);
        var listed = Assert.Single((await Client.ListExportsAsync(new ListExportsRequest { Job = key.Job })).Exports);
        Assert.Equal(key, listed.Export);
        Assert.Equal(2, listed.FileCount);
        Assert.Equal(301_000, listed.TotalBytes);
        Assert.Equal(gguf.Bytes, await DownloadAsync(key, "model.gguf"));
        Assert.Equal(nested.Bytes, await DownloadAsync(key, "tokenizer/tokenizer.json"));

        // Idempotent retry of the same commit; any change to a committed export is refused.
        Assert.True((await Client.CommitExportAsync(new CommitExportRequest { Export = key, ManifestJson = Manifest(key, gguf, nested) })).AlreadyCommitted);
        var late = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(key, File("extra.bin", 10, 3)));
        Assert.Equal(StatusCode.FailedPrecondition, late.StatusCode);
    }

    [Fact]
    public async Task ACommitWhoseFilesDoNotMatchIsRefusedByNameAndLeavesNothing()
    {
        var key = NewExport("hf");
        var weights = File("model.safetensors", 50_000, 4);
        var config = File("config.json", 500, 5);
        await UploadAsync(key, weights);
        var claimed = (weights.Path, File("x", 50_000, 6).Bytes); // export.json names other bytes than those uploaded
        var e = await Assert.ThrowsAsync<RpcException>(() =>
            Client.CommitExportAsync(new CommitExportRequest { Export = key, ManifestJson = Manifest(key, claimed, config) }).ResponseAsync);
        Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
        Assert.Contains("model.safetensors is stored with", e.Status.Detail);
        Assert.Contains("config.json was never uploaded", e.Status.Detail);
        Assert.Empty(await BlobsOfAsync(key));
        Assert.Empty((await Client.ListExportsAsync(new ListExportsRequest { Job = key.Job })).Exports);
    }

    [Fact]
    public async Task BytesThatDoNotHashToTheAnnouncedShaAndUnknownFormatsAreRefused()
    {
        var key = NewExport();
        var file = File("model.gguf", 1_000, 7);
        var e = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(key, file, sha: new string('0', 64)));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Empty(await BlobsOfAsync(key));

        var unknown = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(NewExport("onnx-int2"), file));
        Assert.Equal(StatusCode.InvalidArgument, unknown.StatusCode);
        Assert.Contains("'onnx-int2'", unknown.Status.Detail);
        var badPath = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(key, ("../escape.bin", file.Bytes)));
        Assert.Equal(StatusCode.InvalidArgument, badPath.StatusCode);
    }
}
