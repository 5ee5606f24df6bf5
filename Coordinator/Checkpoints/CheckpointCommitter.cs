// Commits a checkpoint step through CheckpointStore once every rank reported, in the background, and tells the job grain.
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Threading.Channels;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.Coordinator.Checkpoints;

/// <summary>
/// The second phase of the two-phase save. The report that completes a step only queues it here, so neither the worker's
/// control stream nor the job grain waits on blob storage; one loop then asks the job grain for the step's files and rank
/// 0's manifest, calls CommitCheckpoint (which verifies every file and writes manifest.json last) and records the outcome
/// in the job: committed (a re-formation resumes from it) or an event with the store's reason (training goes on).
/// </summary>
public sealed class CheckpointCommitter : BackgroundService
{
    /// <summary>Aspire's services__checkpoints__grpc__0: the CheckpointStore's gRPC address.</summary>
    public const string AddressKey = $"services:{ServiceNames.Checkpoints}:grpc:0";

    /// <summary>Store unreachable: tries before the step is given up (the next checkpoint interval saves again).</summary>
    const int Attempts = 4;

    readonly Channel<(string JobId, long Generation, long Step)> queue = Channel.CreateUnbounded<(string, long, long)>(new UnboundedChannelOptions { SingleReader = true });
    readonly IGrainFactory grains;
    readonly CoordinatorMetrics metrics;
    readonly ILogger<CheckpointCommitter> logger;
    readonly GrpcChannel? channel;
    readonly Store.CheckpointStoreClient? store;

    /// <param name="tls">The Coordinator's certificates (Cluster:Tls:*), registered by ControlChannelTls when set: the store is then dialled with mutual TLS.</param>
    public CheckpointCommitter(IConfiguration config, IGrainFactory grains, CoordinatorMetrics metrics, ILogger<CheckpointCommitter> logger, ClusterTls? tls = null)
    {
        (this.grains, this.metrics, this.logger) = (grains, metrics, logger);
        Address = config[AddressKey] is { Length: > 0 } a ? a : null;
        if (Address is null)
        {
            logger.LogWarning("No checkpoint store is configured ({Key}): checkpoints will be reported but never committed, and jobs resume from step 0", AddressKey);
            return;
        }
        if (!Uri.TryCreate(Address, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            throw new InvalidOperationException($"{AddressKey} is '{Address}'; expected an http:// or https:// address of the CheckpointStore");
        channel = ClusterChannel.For(uri, tls, AddressKey);
        store = new Store.CheckpointStoreClient(channel);
    }

    /// <summary>The CheckpointStore's address, or null when none is configured.</summary>
    public string? Address { get; }

    /// <summary>Every rank of <paramref name="step"/> reported: commit it soon.</summary>
    public void Enqueue(string jobId, long generation, long step) => queue.Writer.TryWrite((jobId, generation, step));

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        await foreach (var (jobId, generation, step) in queue.Reader.ReadAllAsync(stoppingToken))
        {
            try { await CommitAsync(jobId, generation, step, stoppingToken); }
            catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested) { return; }
            catch (Exception e) { logger.LogError(e, "Job {Job}: the commit of step {Step} failed unexpectedly", jobId, step); }
        }
    }

    async Task CommitAsync(string jobId, long generation, long step, CancellationToken ct)
    {
        var job = grains.GetGrain<ITrainingJobGrain>(jobId);
        if (store is null)
        {
            metrics.CheckpointCommit("unconfigured");
            await job.CheckpointNotCommittedAsync(generation, step, $"no checkpoint store is configured ({AddressKey}); the checkpoint stays uncommitted");
            return;
        }
        var record = await job.GetCompleteCheckpointAsync(generation, step);
        if (record is null) return; // the job was told already, or a duplicate queue entry

        var request = new CommitCheckpointRequest { Job = jobId, Step = step, Generation = generation };
        request.Files.AddRange(record.Files.Select(f => new ExpectedFile { FileName = f.File, Size = f.SizeBytes, Sha256 = f.Sha256 }));
        string? problem = ManifestOfRankZero(record, out string manifest);
        if (problem is not null)
        {
            metrics.CheckpointCommit("refused");
            await job.CheckpointNotCommittedAsync(generation, step, problem);
            return;
        }
        request.ManifestJson = manifest;

        for (int attempt = 1; ; attempt++)
        {
            try
            {
                await store.CommitCheckpointAsync(request, deadline: DateTime.UtcNow.AddMinutes(2), cancellationToken: ct);
                metrics.CheckpointCommit("committed");
                await job.CheckpointCommittedAsync(new CommittedCheckpoint(step, generation, record.Files.Length, record.Files.Sum(f => f.SizeBytes)));
                return;
            }
            catch (RpcException e) when (!ct.IsCancellationRequested && IsUnreachable(e.StatusCode) && attempt < Attempts)
            {
                var delay = TimeSpan.FromSeconds(Math.Pow(2, attempt - 1));
                logger.LogWarning("Job {Job}: the checkpoint store at {Address} did not answer the commit of step {Step} ({Status}); retrying in {Delay} s",
                    jobId, Address, step, e.StatusCode, delay.TotalSeconds);
                await Task.Delay(delay, ct);
            }
            catch (RpcException e) when (!ct.IsCancellationRequested)
            {
                bool refused = !IsUnreachable(e.StatusCode);
                metrics.CheckpointCommit(refused ? "refused" : "failed");
                string reason = refused
                    ? $"the checkpoint store refused it: {e.Status.Detail}"
                    : $"the checkpoint store at {Address} could not be reached after {Attempts} attempts ({e.StatusCode}: {e.Status.Detail})";
                logger.LogWarning("Job {Job}: step {Step} not committed: {Reason}", jobId, step, reason);
                await job.CheckpointNotCommittedAsync(generation, step, reason);
                return;
            }
        }
    }

    static bool IsUnreachable(StatusCode code) => code is StatusCode.Unavailable or StatusCode.DeadlineExceeded or StatusCode.Unknown or StatusCode.Internal;

    /// <summary>
    /// Rank 0's manifest JSON without "files" and "committed_utc": the store writes those from the reported files, which
    /// are the only ones that count. Returns the problem when there is no usable manifest.
    /// </summary>
    static string? ManifestOfRankZero(CheckpointRecord record, out string manifest)
    {
        manifest = "";
        var rankZero = record.Files.FirstOrDefault(f => f.Rank == 0);
        if (rankZero is null || string.IsNullOrWhiteSpace(rankZero.ManifestJson))
            return "rank 0 reported no manifest (CheckpointReport.manifest_json), so there is nothing to commit";
        try
        {
            if (JsonNode.Parse(rankZero.ManifestJson) is not JsonObject node) return "rank 0's manifest_json is not a JSON object";
            node.Remove("files");
            node.Remove("committed_utc");
            manifest = node.ToJsonString();
            return null;
        }
        catch (JsonException e)
        {
            return $"rank 0's manifest_json is not valid JSON: {e.Message}";
        }
    }

    public override void Dispose()
    {
        base.Dispose();
        channel?.Dispose();
    }
}
