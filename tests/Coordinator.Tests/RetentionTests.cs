// Retention (JobSpec.KeepLast): after each commit the Coordinator deletes the older committed checkpoints from the real
// CheckpointStore over real Azurite, and never the step a generation is resuming from.
using System.Security.Cryptography;
using System.Text.Json;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Checkpoints;
using Google.Protobuf;
using Grpc.Core;
using ControlCheckpointReport = DeepSeekCluster.Contracts.Control.CheckpointReport;
using ControlStepReport = DeepSeekCluster.Contracts.Control.StepReport;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(CoordinatorCollection.Name)] // one silo start at a time keeps the 2-core machines steady
public class RetentionTests
{
    const string Job = "keep-two";

    [Fact]
    public async Task AJobWithKeepLastTwoOverFiveCheckpointsEndsWithExactlyTheLastTwoInAzurite()
    {
        await using var azurite = await AzuriteServer.StartAsync();
        await using var store = await StoreHost.StartAsync(AzuriteServer.ConnectionString(azurite.Port));
        await using var coordinator = await CoordinatorHost.StartAsync(new Dictionary<string, string?> { [CheckpointCommitter.AddressKey] = store.Address });
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        var bearer = new Metadata { { "authorization", $"Bearer {CoordinatorHost.Token}" } };
        using var worker = coordinator.Control.Connect(bearer, cancellationToken: cts.Token);
        await worker.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "keep-w0", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = $"127.0.0.1:{FreePort.Next()}" } });
        await TestSpecs.EventuallyAsync(() => coordinator.Http.GetStringAsync("/workers"), w => w.Contains("keep-w0"), "worker keep-w0 registered");

        var spec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 5) with { Name = Job, CheckpointInterval = 1, KeepLast = 2 };
        await coordinator.Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = JsonSerializer.Serialize(spec, JobSpecJson.Options) }, bearer);
        Contracts.Control.Assignment? assignment = null;
        while (assignment is null && await worker.ResponseStream.MoveNext(cts.Token)) assignment = worker.ResponseStream.Current.Assignment;
        Assert.Equal((1L, 1, 0L), (assignment!.Generation, assignment.World, assignment.ResumeStep));
        await worker.RequestStream.WriteAsync(new WorkerMessage { Resumed = new Resumed { Generation = 1, Step = 0, Source = "start", SourceRank = -1 } });

        // Five steps, a checkpoint after each: uploaded to the store, reported, committed before the next one is saved.
        for (long step = 1; step <= 5; step++)
        {
            await worker.RequestStream.WriteAsync(new WorkerMessage { Step = new ControlStepReport { Generation = 1, Step = step, Loss = 9 - step, SampleStart = (step - 1) * 8, SampleCount = 8 } });
            var file = new byte[4096 + (int)step];
            new Random((int)step).NextBytes(file);
            await UploadAsync(store, step, file);
            await worker.RequestStream.WriteAsync(new WorkerMessage
            {
                Checkpoint = new ControlCheckpointReport
                {
                    Generation = 1, Step = step, Rank = 0, File = "rank-0.safetensors", SizeBytes = file.Length,
                    Sha256 = Convert.ToHexStringLower(SHA256.HashData(file)), ManifestJson = Manifest(step),
                },
            });
            long committed = step;
            await TestSpecs.EventuallyAsync(() => StatusAsync(coordinator), s => s.Committed.Any(c => c.Step == committed), $"the commit of step {step}");
        }

        var listed = await TestSpecs.EventuallyAsync(async () => (await store.Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = Job })).Checkpoints.Select(c => c.Step).ToArray(),
            steps => steps.SequenceEqual([4L, 5L]), "retention down to the last two committed steps in Azurite");
        Assert.Equal([4L, 5L], listed);
        var status = await TestSpecs.EventuallyAsync(() => StatusAsync(coordinator), s => s.Committed.Count(c => c.DeletedAt is not null) == 3, "the deletions in the job");
        Assert.Equal(JobState.Completed, status.State);
        Assert.Equal([1L, 2L, 3L], status.Committed.Where(c => c.DeletedAt is not null).Select(c => c.Step));
        Assert.Equal([4L, 5L], status.Committed.Where(c => c.DeletedAt is null).Select(c => c.Step));
        Assert.Contains(status.Events, e => e.Kind == JobEventKinds.CheckpointsDeleted && e.Message.Contains("keepLast 2"));
        // What is left loads: the newest checkpoint's manifest is intact.
        Assert.Contains("\"step\":5", (await store.Client.GetManifestAsync(new GetManifestRequest { Job = Job, Step = 5 })).ManifestJson.Replace(" ", ""));
    }

    [Fact]
    public async Task TheStepAGenerationIsResumingFromIsKeptUntilItResumed()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("keep-resume");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 10) with { KeepLast = 1 });
        await c.Worker("k1").RegisterAsync(TestSpecs.Worker("k1"), null);
        long k2 = await c.Worker("k2").RegisterAsync(TestSpecs.Worker("k2"), null);
        // The job may form on k1 alone first and grow: g is the generation with both.
        long g = (await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 2, "formation on two")).Generation;
        await job.ReportResumedAsync(g, new ResumedReport { Step = 0, Source = "start" });
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(2, g, 2, 100));

        // k2 dies: the next generation is told to resume from step 2. Then the old generation's commit of step 4, queued
        // before, lands.
        await c.Worker("k2").DisconnectedAsync(k2, "killed", LeaveKind.Lost);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 1, "re-formation on k1");
        Assert.Equal(2, (await c.Worker("k1").GetAsync()).Assignment!.ResumeStep);
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(4, g, 2, 100));
        Assert.Empty(c.Handed.Prunes); // keepLast 1 would delete step 2, but the new generation may be loading it

        await job.ReportResumedAsync(g + 1, new ResumedReport { Step = 4, Source = "replica", SourceRank = 0 });
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(6, g + 1, 1, 100));
        var (jobId, keep) = Assert.Single(c.Handed.Prunes);
        Assert.Equal("keep-resume", jobId);
        Assert.Equal([6L], keep); // steps 2 and 4 go
    }

    static async Task<JobStatus> StatusAsync(CoordinatorHost host) =>
        JsonSerializer.Deserialize<JobStatus>(await host.Http.GetStringAsync($"/jobs/{Job}"), JobSpecJson.Options)!;

    static string Manifest(long step) => JsonSerializer.Serialize(new
    {
        format = "deepseek-cluster/sharded-checkpoint/1", job = Job, step, generation = 1, consumed_samples = step * 8,
        layout = new { dp = 1, pp = 1 }, tensors = new { },
    });

    static async Task UploadAsync(StoreHost store, long step, byte[] file)
    {
        using var call = store.Client.UploadShard();
        await call.RequestStream.WriteAsync(new UploadShardMessage
        {
            Header = new UploadHeader { Job = Job, Step = step, Rank = 0, TotalSize = file.Length, Sha256 = Convert.ToHexStringLower(SHA256.HashData(file)) },
        });
        await call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = 0, Data = ByteString.CopyFrom(file) } });
        await call.RequestStream.CompleteAsync();
        await call.ResponseAsync;
    }
}
