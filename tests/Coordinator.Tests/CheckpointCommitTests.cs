// The Coordinator commits a checkpoint through a real CheckpointStore once every rank reported, shows it in the job, turns a
// refused commit into a job event, and resumes a re-formed job from the newest committed step.
using System.Security.Cryptography;
using System.Text.Json;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Coordinator.Checkpoints;
using Google.Protobuf;
using Grpc.Core;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(CoordinatorCollection.Name)] // one silo start at a time keeps the 2-core machines steady
public class CheckpointCommitTests
{
    const string Job = "ckpt-job";

    [Fact]
    public async Task TheCoordinatorCommitsAStepOnceEveryRankReportedAndResumesFromIt()
    {
        await using var store = await StoreHost.StartAsync();
        await using var coordinator = await CoordinatorHost.StartAsync(new Dictionary<string, string?> { [CheckpointCommitter.AddressKey] = store.Address });
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(40));
        using var first = await ConnectAsync(coordinator, "ckpt-w0", cts.Token);
        using var second = await ConnectAsync(coordinator, "ckpt-w1", cts.Token);

        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 2, steps: 100) with { Name = Job }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        await coordinator.Control.SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, Bearer());
        var a = await NextAssignmentAsync(first, cts.Token);
        var b = await NextAssignmentAsync(second, cts.Token);
        Assert.Equal((1L, 2, 0L), (a.Generation, a.World, a.ResumeStep));
        var byRank = new[] { (a, first), (b, second) }.OrderBy(x => x.Item1.Rank).Select(x => x.Item2).ToArray();

        // Step 2: both ranks upload straight to the store, then report; rank 0's report carries the manifest.
        var files = new[] { Shard(0, 70_000), Shard(1, 50_000) };
        foreach (var (f, rank) in files.Select((f, r) => (f, r))) await UploadAsync(store, 2, rank, f);
        for (int rank = 0; rank < 2; rank++) await ReportAsync(byRank[rank], 2, rank, files[rank], rank == 0 ? Manifest(2) : "");

        var listed = await TestSpecs.EventuallyAsync(() => store.Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = Job }).ResponseAsync,
            l => l.Checkpoints.Count == 1, "the commit of step 2");
        Assert.Equal((2L, 1L, 2, 120_000L), (listed.Checkpoints[0].Step, listed.Checkpoints[0].Generation, listed.Checkpoints[0].FileCount, listed.Checkpoints[0].TotalBytes));
        using (var manifest = JsonDocument.Parse((await store.Client.GetManifestAsync(new GetManifestRequest { Job = Job, Step = 2 })).ManifestJson))
        {
            Assert.Equal(2, manifest.RootElement.GetProperty("layout").GetProperty("dp").GetInt32());
            Assert.Equal(["rank-0.safetensors", "rank-1.safetensors"], manifest.RootElement.GetProperty("files").EnumerateArray().Select(f => f.GetProperty("name").GetString()));
        }
        var status = await TestSpecs.EventuallyAsync(() => JobAsync(coordinator), j => j.GetProperty("committed").GetArrayLength() == 1, "step 2 in GET /jobs/{id}");
        var committed = status.GetProperty("committed")[0];
        Assert.Equal((2L, 1L, 2, 120_000L), (committed.GetProperty("step").GetInt64(), committed.GetProperty("generation").GetInt64(),
            committed.GetProperty("files").GetInt32(), committed.GetProperty("bytes").GetInt64()));
        Assert.DoesNotContain("\"layout\"", status.GetRawText()); // the manifest is the store's, not the job status's

        // Step 4: rank 1 reports a file it never uploaded. The store refuses, the job says why and trains on.
        var step4 = Shard(0, 30_000);
        await UploadAsync(store, 4, 0, step4);
        await ReportAsync(byRank[0], 4, 0, step4, Manifest(4));
        await ReportAsync(byRank[1], 4, 1, Shard(1, 30_000), "");
        status = await TestSpecs.EventuallyAsync(() => JobAsync(coordinator), j => Events(j).Any(e => e.Contains("step 4")  && e.Contains("not committed")),
            "the refusal of step 4 as a job event");
        string refusal = Events(status).Last(e => e.Contains("not committed"));
        Assert.Contains("rank-1.safetensors is missing", refusal);
        Assert.Equal("running", status.GetProperty("state").GetString());
        Assert.Equal([2L], (await store.Client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = Job })).Checkpoints.Select(c => c.Step));

        // Rank 1's process dies: the survivor's new generation resumes from step 2, the newest committed step.
        second.Dispose();
        var resumed = await NextAssignmentAsync(first, cts.Token);
        Assert.Equal((2L, 1, 2L), (resumed.Generation, resumed.World, resumed.ResumeStep));

        string metrics = await coordinator.Http.GetStringAsync("/metrics");
        Assert.Contains("deepseek_cluster_workers", metrics);
        Assert.Contains("deepseek_cluster_checkpoint_commits", metrics);
    }

    static Metadata Bearer() => new() { { "authorization", $"Bearer {CoordinatorHost.Token}" } };

    static async Task<AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage>> ConnectAsync(CoordinatorHost host, string id, CancellationToken ct)
    {
        var stream = host.Control.Connect(Bearer(), cancellationToken: ct);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = id, Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = $"127.0.0.1:{FreePort.Next()}" } });
        await TestSpecs.EventuallyAsync(() => host.Http.GetStringAsync("/workers"), w => w.Contains(id), $"worker {id} registered");
        return stream;
    }

    static async Task<Assignment> NextAssignmentAsync(AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> stream, CancellationToken ct)
    {
        while (await stream.ResponseStream.MoveNext(ct))
            if (stream.ResponseStream.Current.Assignment is { } a) return a;
        throw new InvalidOperationException("the stream ended before an assignment came");
    }

    static Task ReportAsync(AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> stream, long step, int rank, byte[] file, string manifest) =>
        stream.RequestStream.WriteAsync(new WorkerMessage
        {
            Checkpoint = new CheckpointReport
            {
                Generation = 1, Step = step, Rank = rank, File = $"rank-{rank}.safetensors", SizeBytes = file.Length,
                Sha256 = Convert.ToHexStringLower(SHA256.HashData(file)), ManifestJson = manifest,
            },
        });

    /// <summary>What rank 0 sends: the manifest without the store's fields (a stale "files" list is dropped by the Coordinator).</summary>
    static string Manifest(long step) => JsonSerializer.Serialize(new
    {
        format = "deepseek-cluster/sharded-checkpoint/1", job = Job, step, generation = 1, consumed_samples = step * 8,
        layout = new { dp = 2, pp = 1 }, tensors = new { }, files = new[] { new { name = "stale", size = 0, sha256 = "" } },
    });

    static byte[] Shard(int seed, int size)
    {
        var bytes = new byte[size];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    static async Task UploadAsync(StoreHost store, long step, int rank, byte[] file)
    {
        using var call = store.Client.UploadShard();
        await call.RequestStream.WriteAsync(new UploadShardMessage
        {
            Header = new UploadHeader { Job = Job, Step = step, Rank = rank, TotalSize = file.Length, Sha256 = Convert.ToHexStringLower(SHA256.HashData(file)) },
        });
        await call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = 0, Data = ByteString.CopyFrom(file) } });
        await call.RequestStream.CompleteAsync();
        await call.ResponseAsync;
    }

    static async Task<JsonElement> JobAsync(CoordinatorHost host)
    {
        using var doc = JsonDocument.Parse(await host.Http.GetStringAsync($"/jobs/{Job}"));
        return doc.RootElement.Clone();
    }

    static IEnumerable<string> Events(JsonElement job) => job.GetProperty("events").EnumerateArray().Select(e => e.GetProperty("message").GetString()!);
}
