// Every behaviour of the store, run once against the folder backend and once against real Azurite.
using DeepSeekCluster.CheckpointStore.Tests.Infrastructure;
using DeepSeekCluster.Contracts.Checkpoints;
using Grpc.Core;
using static DeepSeekCluster.CheckpointStore.Tests.Infrastructure.ShardFiles;

namespace DeepSeekCluster.CheckpointStore.Tests;

public sealed class FolderBackendTests(FolderBackendFixture fixture) : CheckpointStoreBehaviour(fixture), IClassFixture<FolderBackendFixture>;

public sealed class AzuriteBackendTests(AzuriteBackendFixture fixture) : CheckpointStoreBehaviour(fixture), IClassFixture<AzuriteBackendFixture>;

public abstract class CheckpointStoreBehaviour(BackendFixture fixture)
{
    private Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient Client => fixture.Host.Client;
    private static string NewJob() => $"job-{Guid.NewGuid():N}"[..20];

    private async Task<long[]> CommittedStepsAsync(string job) =>
        (await Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job })).Checkpoints.Select(c => c.Step).ToArray();

    private async Task AssertLoadsBitwiseAsync(string job, long step, params ShardFile[] files)
    {
        foreach (var file in files)
        {
            foreach (var tensor in file.Tensors)
            {
                var (description, bytes) = await DownloadAsync(Client, new DownloadTensorRequest { Job = job, Step = step, TensorName = tensor.Name });
                Assert.Equal(file.FileName, description.FileName);
                Assert.Equal("F32", description.Dtype);
                Assert.Equal(tensor.Shape, description.Shape);
                Assert.Equal(tensor.Bytes, bytes);
            }
        }
    }

    [Fact]
    public async Task UploadCommitDownloadRoundTripIsBitwise()
    {
        string job = NewJob();
        var rank0 = Rank(0, seed: 1);
        var rank1 = Rank(1, seed: 2);
        await UploadAsync(Client, job, 100, 0, rank0);
        await UploadAsync(Client, job, 100, 1, rank1);
        Assert.Empty(await CommittedStepsAsync(job)); // uploaded but not committed: invisible

        await CommitAsync(Client, job, 100, generation: 3, rank0, rank1);

        var listed = Assert.Single((await Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job })).Checkpoints);
        Assert.Equal(100, listed.Step);
        Assert.Equal(3, listed.Generation);
        Assert.Equal(2, listed.FileCount);
        Assert.Equal(rank0.Bytes.Length + rank1.Bytes.Length, listed.TotalBytes);
        string manifest = (await Client.GetManifestAsync(new GetManifestRequest { Job = job, Step = 100 })).ManifestJson;
        Assert.Contains(rank1.Sha256, manifest);
        Assert.Contains("\"layout\"", manifest);
        await AssertLoadsBitwiseAsync(job, 100, rank0, rank1);
    }

    [Fact]
    public async Task RowRangeDownloadReturnsExactlyThoseRows()
    {
        string job = NewJob();
        var rank0 = Rank(0, seed: 3, rows: 50, cols: 96);
        await UploadAsync(Client, job, 1, 0, rank0);
        await CommitAsync(Client, job, 1, 1, rank0);
        var matrix = rank0.Tensors[0];

        var (description, bytes) = await DownloadAsync(Client, new DownloadTensorRequest
        {
            Job = job, Step = 1, TensorName = matrix.Name, FileName = rank0.FileName, HasRows = true, RowStart = 17, RowCount = 9,
        });

        Assert.Equal(new long[] { 50L, 96L }, description.Shape);
        Assert.Equal(17, description.RowStart);
        Assert.Equal(9, description.RowCount);
        Assert.Equal(matrix.Bytes.AsSpan(17 * 96 * 4, 9 * 96 * 4).ToArray(), bytes);

        var outside = await Assert.ThrowsAsync<RpcException>(() => DownloadAsync(Client, new DownloadTensorRequest
        {
            Job = job, Step = 1, TensorName = matrix.Name, HasRows = true, RowStart = 45, RowCount = 6,
        }));
        Assert.Equal(StatusCode.OutOfRange, outside.StatusCode);
        Assert.Contains("50 rows", outside.Status.Detail);
    }

    [Fact]
    public async Task InterruptedUploadResumesFromTheReportedOffsetAndKeepsTheHash()
    {
        string job = NewJob();
        var rank0 = Rank(0, seed: 4, rows: 512, cols: 512); // 1 MiB: sixteen 64 KiB blocks
        var status = new UploadStatusRequest { Job = job, Step = 7, FileName = rank0.FileName, Sha256 = rank0.Sha256 };
        // HTTP/2 lets the client run ahead of the server by a flow-control window; drop the stream only once
        // the store has staged something, so the test does not depend on how far the server had read.
        await UploadAsync(Client, job, 7, 0, rank0, stopAfter: rank0.Bytes.Length / 2, beforeStop: () => fixture.Host.WaitUntilStagedAsync(status));

        long received = await fixture.Host.ReceivedAfterDropAsync(status);
        Assert.InRange(received, 1, rank0.Bytes.Length / 2);

        var reply = await UploadAsync(Client, job, 7, 0, rank0, from: received);
        Assert.Equal(rank0.Sha256, reply!.Sha256);
        var done = await Client.GetUploadStatusAsync(status);
        Assert.True(done.Complete);
        Assert.Equal(rank0.Bytes.Length, done.ReceivedBytes);

        await CommitAsync(Client, job, 7, 1, rank0);
        await AssertLoadsBitwiseAsync(job, 7, rank0);
    }

    [Fact]
    public async Task UploadWhoseBytesDoNotMatchItsHashIsDiscarded()
    {
        string job = NewJob();
        var rank0 = Rank(0, seed: 5);
        string wrong = Rank(0, seed: 6).Sha256;
        var e = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 1, 0, rank0, sha256: wrong));
        Assert.Equal(StatusCode.DataLoss, e.StatusCode);
        Assert.Contains(rank0.FileName, e.Status.Detail);
        var status = await Client.GetUploadStatusAsync(new UploadStatusRequest { Job = job, Step = 1, FileName = rank0.FileName, Sha256 = rank0.Sha256 });
        Assert.False(status.Complete);
    }

    [Fact]
    public async Task CommitWithAMissingWrongSizeOrWrongHashFileIsRefusedNamingItAndTheEarlierCheckpointStillLoads()
    {
        string job = NewJob();
        var good0 = Rank(0, seed: 10);
        var good1 = Rank(1, seed: 11);
        await UploadAsync(Client, job, 10, 0, good0);
        await UploadAsync(Client, job, 10, 1, good1);
        await CommitAsync(Client, job, 10, 1, good0, good1);

        var next0 = Rank(0, seed: 20);
        var next1 = Rank(1, seed: 21);
        await UploadAsync(Client, job, 20, 0, next0); // rank 1 never uploads

        var missing = await Assert.ThrowsAsync<RpcException>(() => CommitAsync(Client, job, 20, 1, next0, next1));
        Assert.Equal(StatusCode.FailedPrecondition, missing.StatusCode);
        Assert.Contains("rank-1.safetensors is missing", missing.Status.Detail);

        var wrongSize = next0.Expected;
        wrongSize.Size += 8;
        var sized = await Assert.ThrowsAsync<RpcException>(() => Client.CommitCheckpointAsync(Commit(job, 20, wrongSize)).ResponseAsync);
        Assert.Contains($"rank-0.safetensors is {next0.Bytes.Length} bytes, expected {next0.Bytes.Length + 8}", sized.Status.Detail);

        var wrongHash = next0.Expected;
        wrongHash.Sha256 = good0.Sha256;
        var hashed = await Assert.ThrowsAsync<RpcException>(() => Client.CommitCheckpointAsync(Commit(job, 20, wrongHash)).ResponseAsync);
        Assert.Contains($"rank-0.safetensors has SHA-256 {next0.Sha256}, expected {good0.Sha256}", hashed.Status.Detail);

        Assert.Equal(new long[] { 10L }, await CommittedStepsAsync(job));
        var notThere = await Assert.ThrowsAsync<RpcException>(() => Client.GetManifestAsync(new GetManifestRequest { Job = job, Step = 20 }).ResponseAsync);
        Assert.Equal(StatusCode.NotFound, notThere.StatusCode);
        await AssertLoadsBitwiseAsync(job, 10, good0, good1);
    }

    private static CommitCheckpointRequest Commit(string job, long step, params ExpectedFile[] files)
    {
        var request = new CommitCheckpointRequest { Job = job, Step = step, Generation = 1 };
        request.Files.AddRange(files);
        return request;
    }

    [Fact]
    public async Task ASecondWriterCannotReplaceACommittedStepButAnIdenticalRetryIsAccepted()
    {
        string job = NewJob();
        var first = Rank(0, seed: 30);
        await UploadAsync(Client, job, 5, 0, first);
        await CommitAsync(Client, job, 5, generation: 2, first);

        var retried = await Client.CommitCheckpointAsync(Commit(job, 5, first.Expected) is var r ? WithGeneration(r, 2) : null!);
        Assert.True(retried.AlreadyCommitted);

        var zombie = Rank(0, seed: 31);
        var upload = await Assert.ThrowsAsync<RpcException>(() => UploadAsync(Client, job, 5, 0, zombie));
        Assert.Equal(StatusCode.FailedPrecondition, upload.StatusCode);
        Assert.Contains("already committed", upload.Status.Detail);

        var other = await Assert.ThrowsAsync<RpcException>(() => Client.CommitCheckpointAsync(WithGeneration(Commit(job, 5, first.Expected), 1)).ResponseAsync);
        Assert.Equal(StatusCode.AlreadyExists, other.StatusCode);
        Assert.Contains("generation 2", other.Status.Detail);
        await AssertLoadsBitwiseAsync(job, 5, first);
    }

    private static CommitCheckpointRequest WithGeneration(CommitCheckpointRequest request, long generation)
    {
        request.Generation = generation;
        return request;
    }

    [Fact]
    public async Task RetentionKeepsTheLastNAndEveryKthAndDropsOlderLeftovers()
    {
        string job = NewJob();
        foreach (long step in new long[] { 10, 20, 30, 40, 50, 60 })
        {
            var file = Rank(0, seed: (int)step, rows: 4, cols: 8);
            await UploadAsync(Client, job, step, 0, file);
            await CommitAsync(Client, job, step, 1, file);
        }
        await UploadAsync(Client, job, 35, 0, Rank(0, seed: 35, rows: 4, cols: 8)); // a save that never committed
        var inFlight = Rank(0, seed: 70, rows: 64, cols: 64);
        await UploadAsync(Client, job, 70, 0, inFlight, stopAfter: 4096); // a save still in progress, newer than any commit

        var reply = await Client.ApplyRetentionAsync(new ApplyRetentionRequest { Job = job, KeepLast = 2, KeepEvery = 20 });

        Assert.Equal(new long[] { 20L, 40L, 50L, 60L }, reply.KeptSteps);
        Assert.Equal(new long[] { 10L, 30L }, reply.DeletedSteps);
        Assert.Equal(new long[] { 35L }, reply.DeletedUncommittedSteps);
        Assert.Equal(new long[] { 20L, 40L, 50L, 60L }, await CommittedStepsAsync(job));
        var status = await Client.GetUploadStatusAsync(new UploadStatusRequest { Job = job, Step = 70, FileName = inFlight.FileName, Sha256 = inFlight.Sha256 });
        await UploadAsync(Client, job, 70, 0, inFlight, from: status.ReceivedBytes); // the in-flight save can still finish
        await CommitAsync(Client, job, 70, 1, inFlight);
        await AssertLoadsBitwiseAsync(job, 70, inFlight);
    }

    [Fact]
    public async Task EvaluationsAreKeptWithTheirStepOnceAndGoWithItByRetention()
    {
        string job = NewJob();
        foreach (long step in new long[] { 10, 20 })
        {
            var file = Rank(0, seed: (int)step, rows: 4, cols: 8);
            await UploadAsync(Client, job, step, 0, file);
            await CommitAsync(Client, job, step, 1, file);
        }
        const string Results = """{"results": {"kjv_cloze": {"acc,none": 0.25}}}""";
        var first = await Client.RecordEvaluationAsync(new RecordEvaluationRequest { Job = job, Step = 10, EvaluationId = "eval-1", ResultsJson = Results });
        Assert.False(first.AlreadyRecorded);
        Assert.True((await Client.RecordEvaluationAsync(new RecordEvaluationRequest { Job = job, Step = 10, EvaluationId = "eval-1", ResultsJson = Results })).AlreadyRecorded);
        await Client.RecordEvaluationAsync(new RecordEvaluationRequest { Job = job, Step = 10, EvaluationId = "eval-2", ResultsJson = Results.Replace("0.25", "0.5") });

        var listed = (await Client.ListEvaluationsAsync(new ListEvaluationsRequest { Job = job, Step = 10 })).Evaluations;
        Assert.Equal(["eval-1", "eval-2"], listed.Select(e => e.EvaluationId));
        Assert.Equal(Results, listed[0].ResultsJson);
        Assert.Empty((await Client.ListEvaluationsAsync(new ListEvaluationsRequest { Job = job, Step = 20 })).Evaluations);

        // A record is never replaced; only a committed step keeps scores; the JSON must be the harness's shape.
        async Task Refused(StatusCode code, string expected, RecordEvaluationRequest request)
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => Client.RecordEvaluationAsync(request).ResponseAsync);
            Assert.Equal(code, e.StatusCode);
            Assert.Contains(expected, e.Status.Detail);
        }
        await Refused(StatusCode.AlreadyExists, "recorded with other results", new() { Job = job, Step = 10, EvaluationId = "eval-1", ResultsJson = Results.Replace("0.25", "0.75") });
        await Refused(StatusCode.NotFound, "step 15 of job", new() { Job = job, Step = 15, EvaluationId = "eval-3", ResultsJson = Results });
        await Refused(StatusCode.InvalidArgument, "not JSON", new() { Job = job, Step = 10, EvaluationId = "eval-4", ResultsJson = "{" });
        await Refused(StatusCode.InvalidArgument, "a \"results\" object", new() { Job = job, Step = 10, EvaluationId = "eval-4", ResultsJson = "[]" });
        await Refused(StatusCode.InvalidArgument, "evaluation_id '../x'", new() { Job = job, Step = 10, EvaluationId = "../x", ResultsJson = Results });
        Assert.Equal(2, (await Client.ListEvaluationsAsync(new ListEvaluationsRequest { Job = job, Step = 10 })).Evaluations.Count);

        // Retention deletes step 10 and its scores with it.
        await Client.ApplyRetentionAsync(new ApplyRetentionRequest { Job = job, KeepLast = 1 });
        var gone = await Assert.ThrowsAsync<RpcException>(() => Client.ListEvaluationsAsync(new ListEvaluationsRequest { Job = job, Step = 10 }).ResponseAsync);
        Assert.Equal(StatusCode.NotFound, gone.StatusCode);
        var file10 = Rank(0, seed: 10, rows: 4, cols: 8);
        await UploadAsync(Client, job, 10, 0, file10);
        await CommitAsync(Client, job, 10, 2, file10); // committed again: no scores of the deleted one come back
        Assert.Empty((await Client.ListEvaluationsAsync(new ListEvaluationsRequest { Job = job, Step = 10 })).Evaluations);
    }

    [Fact]
    public async Task RetentionKeepsTheStepsTheCallerNamesCommittedOrOnTheirWay()
    {
        // What the Coordinator asks after a commit: keep the newest, a step a resuming generation may load (20), and the
        // files of a step whose commit is queued behind a newer one (25).
        string job = NewJob();
        foreach (long step in new long[] { 10, 20, 30, 40 })
        {
            var file = Rank(0, seed: (int)step, rows: 4, cols: 8);
            await UploadAsync(Client, job, step, 0, file);
            await CommitAsync(Client, job, step, 1, file);
        }
        var queued = Rank(0, seed: 25, rows: 4, cols: 8);
        await UploadAsync(Client, job, 25, 0, queued);
        await UploadAsync(Client, job, 15, 0, Rank(0, seed: 15, rows: 4, cols: 8)); // a leftover nobody waits for

        var request = new ApplyRetentionRequest { Job = job, KeepLast = 1 };
        request.KeepSteps.AddRange([20, 25]);
        var reply = await Client.ApplyRetentionAsync(request);

        Assert.Equal(new long[] { 20L, 40L }, reply.KeptSteps);
        Assert.Equal(new long[] { 10L, 30L }, reply.DeletedSteps);
        Assert.Equal(new long[] { 15L }, reply.DeletedUncommittedSteps);
        await CommitAsync(Client, job, 25, 1, queued); // its files survived
        Assert.Equal(new long[] { 20L, 25L, 40L }, await CommittedStepsAsync(job));
    }

    [Fact]
    public async Task StorageLostMidUploadGivesAClearErrorAndThePreviousCheckpointStillLoads()
    {
        string job = NewJob();
        var saved = Rank(0, seed: 40);
        await UploadAsync(Client, job, 1, 0, saved);
        await CommitAsync(Client, job, 1, 1, saved);

        var next = Rank(0, seed: 41, rows: 512, cols: 512);
        using var call = Client.UploadShard();
        await call.RequestStream.WriteAsync(new UploadShardMessage
        {
            Header = new UploadHeader { Job = job, Step = 2, Rank = 0, FileName = next.FileName, TotalSize = next.Bytes.Length, Sha256 = next.Sha256 },
        });
        RpcException? failure = null;
        try
        {
            for (int at = 0; at < next.Bytes.Length; at += 16 * 1024)
            {
                if (at == 256 * 1024) fixture.SetStorageLost(true);
                await call.RequestStream.WriteAsync(new UploadShardMessage
                {
                    Chunk = new UploadChunk { Offset = at, Data = Google.Protobuf.ByteString.CopyFrom(next.Bytes, at, 16 * 1024) },
                });
            }
            await call.RequestStream.CompleteAsync();
            await call.ResponseAsync;
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException)
        {
            // A write after the server ended the call fails with a local status; the server's own status is the response's.
            failure = await Assert.ThrowsAsync<RpcException>(() => call.ResponseAsync);
        }
        finally
        {
            fixture.SetStorageLost(false);
        }

        Assert.NotNull(failure);
        Assert.Equal(StatusCode.Unavailable, failure!.StatusCode);
        Assert.Contains("Blob storage", failure.Status.Detail);
        Assert.Contains("tries", failure.Status.Detail);

        var refused = await Assert.ThrowsAsync<RpcException>(() => CommitAsync(Client, job, 2, 1, next));
        Assert.Equal(StatusCode.FailedPrecondition, refused.StatusCode);
        Assert.Equal(new long[] { 1L }, await CommittedStepsAsync(job));
        await AssertLoadsBitwiseAsync(job, 1, saved);
    }
}
