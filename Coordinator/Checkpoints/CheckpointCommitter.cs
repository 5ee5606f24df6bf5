// Commits a checkpoint step through CheckpointStore in the background, applies a job's retention, and tells the job grain.
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

/// <summary>What the job grain hands over: one direction, grain → committer → store → grain (the outcome).</summary>
public interface ICheckpointCommitter
{
    /// <summary>
    /// Every rank of the step reported: <paramref name="record"/> has all their files and rank 0's manifest;
    /// <paramref name="evaluationJson"/> the job's evalTasks scores at that step (rank 0's report), kept with the checkpoint once it commits.
    /// </summary>
    void Commit(string jobId, CheckpointRecord record, string? evaluationJson = null);

    /// <summary>Retention: delete the job's committed steps except <paramref name="keep"/> and the newest.</summary>
    void Prune(string jobId, long[] keep);
}

/// <summary>
/// The second phase of the two-phase save. The job grain hands a complete step over here, so neither the worker's control
/// stream nor the grain waits on blob storage; one loop calls CommitCheckpoint (which verifies every file and writes
/// manifest.json last) and records the outcome in the job: committed (a re-formation resumes from it) or an event with the
/// store's reason (training goes on). The same loop applies retention, so a deletion never races a commit.
/// </summary>
public sealed class CheckpointCommitter : BackgroundService, ICheckpointCommitter
{
    /// <summary>Aspire's services__checkpoints__grpc__0: the CheckpointStore's gRPC address.</summary>
    public const string AddressKey = $"services:{ServiceNames.Checkpoints}:grpc:0";

    /// <summary>Store unreachable: tries before the step is given up (the next checkpoint interval saves again).</summary>
    const int Attempts = 4;

    abstract record Work(string JobId);
    sealed record CommitWork(string JobId, CheckpointRecord Record, string? EvaluationJson) : Work(JobId);
    sealed record PruneWork(string JobId, long[] Keep) : Work(JobId);

    readonly Channel<Work> queue = Channel.CreateUnbounded<Work>(new UnboundedChannelOptions { SingleReader = true });
    readonly IGrainFactory grains;
    readonly CoordinatorMetrics metrics;
    readonly ILogger<CheckpointCommitter> logger;
    readonly GrpcChannel? channel;
    readonly Store.CheckpointStoreClient? store;

    /// <param name="tls">The Coordinator's certificates (Cluster:Tls:*), registered by ControlChannelTls when set: the store is then dialled with mutual TLS.</param>
    /// <param name="token">The cluster token, sent on every call: CheckpointStore refuses a commit or a prune without it.</param>
    public CheckpointCommitter(IConfiguration config, IGrainFactory grains, CoordinatorMetrics metrics, ILogger<CheckpointCommitter> logger, ClusterToken token, ClusterTls? tls = null)
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
        channel = ClusterChannel.For(uri, tls, AddressKey, token: token.ForOutgoingCalls());
        store = new Store.CheckpointStoreClient(channel);
    }

    /// <summary>The CheckpointStore's address, or null when none is configured.</summary>
    public string? Address { get; }

    /// <summary>The id a training job's own scores at a checkpoint have among the step's evaluations ({job}/{step}/evaluations/training.json).</summary>
    public const string TrainingEvaluationId = "training";

    public void Commit(string jobId, CheckpointRecord record, string? evaluationJson = null) => queue.Writer.TryWrite(new CommitWork(jobId, record, evaluationJson));

    /// <summary>The store's client (null when none is configured), for reads the REST API makes (a step's kept evaluations).</summary>
    public Store.CheckpointStoreClient? StoreClient => store;

    public void Prune(string jobId, long[] keep) => queue.Writer.TryWrite(new PruneWork(jobId, keep));

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        await foreach (var work in queue.Reader.ReadAllAsync(stoppingToken))
        {
            try
            {
                if (work is CommitWork c) await CommitAsync(c.JobId, c.Record, c.EvaluationJson, stoppingToken);
                else if (work is PruneWork p) await PruneAsync(p.JobId, p.Keep, stoppingToken);
            }
            catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested) { return; }
            catch (Exception e) { logger.LogError(e, "Job {Job}: {Work} failed unexpectedly", work.JobId, work is CommitWork cw ? $"the commit of step {cw.Record.Step}" : "retention"); }
        }
    }

    async Task CommitAsync(string jobId, CheckpointRecord record, string? evaluationJson, CancellationToken ct)
    {
        var job = grains.GetGrain<ITrainingJobGrain>(jobId);
        long generation = record.Generation, step = record.Step;
        if (store is null)
        {
            metrics.CheckpointCommit("unconfigured");
            await job.CheckpointNotCommittedAsync(generation, step, $"no checkpoint store is configured ({AddressKey}); the checkpoint stays uncommitted");
            return;
        }

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
                // Before the job hears of the commit: a job that completes on it already has its scores in the store.
                if (evaluationJson is not null) await KeepScoresAsync(job, jobId, step, evaluationJson, ct);
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

    /// <summary>
    /// The job's own scores at a committed step, written beside its checkpoint as the evaluation jobs' are (retention deletes
    /// them with it; a retried commit records the same JSON again, which the store acknowledges). A refusal is the job's
    /// event: the scores stay in its status either way, and training goes on.
    /// </summary>
    async Task KeepScoresAsync(ITrainingJobGrain job, string jobId, long step, string evaluationJson, CancellationToken ct)
    {
        try
        {
            var reply = await store!.RecordEvaluationAsync(new RecordEvaluationRequest { Job = jobId, Step = step, EvaluationId = TrainingEvaluationId, ResultsJson = evaluationJson },
                                                           deadline: DateTime.UtcNow.AddMinutes(1), cancellationToken: ct);
            logger.LogInformation("Job {Job}: the scores at step {Step} are kept with its checkpoint ({Key})", jobId, step, reply.Key);
        }
        catch (RpcException e) when (!ct.IsCancellationRequested)
        {
            logger.LogWarning("Job {Job}: the scores at step {Step} are not kept with its checkpoint: {Status}: {Detail}", jobId, step, e.StatusCode, e.Status.Detail);
            await job.RecordEventAsync(JobEventKinds.EvaluationFailed,
                $"the evaluation tasks' scores at step {step} are in the job's status but not kept with its checkpoint: the store said {e.StatusCode}: {e.Status.Detail}", e.Status.Detail);
        }
    }

    /// <summary>
    /// Deletes what the job's retention rule let go (see CheckpointBook.Deletable) and tells the job what the store deleted.
    /// A store that cannot be reached keeps everything until the next commit asks again.
    /// </summary>
    async Task PruneAsync(string jobId, long[] keep, CancellationToken ct)
    {
        if (store is null) return;
        var request = new ApplyRetentionRequest { Job = jobId, KeepLast = 1 };
        request.KeepSteps.AddRange(keep);
        ApplyRetentionReply reply;
        try { reply = await store.ApplyRetentionAsync(request, deadline: DateTime.UtcNow.AddMinutes(2), cancellationToken: ct); }
        catch (RpcException e) when (!ct.IsCancellationRequested)
        {
            logger.LogWarning("Job {Job}: retention not applied, the checkpoint store said {Status}: {Detail}", jobId, e.StatusCode, e.Status.Detail);
            return;
        }
        if (reply.DeletedSteps.Count == 0 && reply.DeletedUncommittedSteps.Count == 0) return;
        await grains.GetGrain<ITrainingJobGrain>(jobId).CheckpointsDeletedAsync([.. reply.DeletedSteps], [.. reply.DeletedUncommittedSteps]);
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
