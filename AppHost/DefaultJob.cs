// The default job: the shipped corpus prepared in data-shards, and the job spec the AppHost's options describe.
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Contracts.Grains;
using Grpc.Core;
using Grpc.Net.Client;

namespace DeepSeekCluster.AppHost;

public static class DefaultJob
{
    /// <summary>Prepares (or reuses: the dataset id is a content address) the corpus in DataShardService.</summary>
    /// <param name="token">The cluster token: DataShardService refuses a call without it.</param>
    public static async Task<string> PrepareCorpusAsync(AppHostOptions options, Resource dataShards, string corpus, string token, CancellationToken ct)
    {
        Log.AppHost($"preparing {Path.GetFileName(corpus)} in data-shards (seq_len {options.SeqLen}, vocabulary {options.VocabSize}); the first run trains the tokenizer");
        using var channel = GrpcChannel.ForAddress(dataShards.GetEndpoint("grpc").Url);
        var client = new DataShards.DataShardsClient(channel);
        var reply = await client.PrepareAsync(new PrepareRequest
        {
            Sources = { new Source { Name = "kjv", Path = corpus, Weight = 1 } },
            SeqLen = options.SeqLen, VocabSize = options.VocabSize,
        }, new Metadata { { "authorization", $"Bearer {token}" } }, deadline: DateTime.UtcNow.AddMinutes(10), cancellationToken: ct);
        Log.AppHost($"dataset {reply.DatasetId}{(reply.Reused ? " (reused)" : "")}: {reply.TrainSamples} train / {reply.ValidationSamples} validation samples");
        return reply.DatasetId;
    }

    /// <summary>
    /// The job of <paramref name="options"/>: data-parallel over whatever workers join (dp 0), a cosine schedule whose warmup
    /// is a tenth of the run up to 30 steps, and room to grow to --max-workers.
    /// </summary>
    public static JobSpec Spec(AppHostOptions options, string datasetId, DateTime now) => new()
    {
        Name = $"{options.Preset}-{now:yyyyMMdd-HHmmss}",
        ModelPreset = options.Preset,
        Dataset = datasetId,
        Parallel = new ParallelPlan { Dp = 0, Pp = options.Pp, Ep = options.Ep, Zero = options.Zero, Redundancy = options.Redundancy, OverlapGradientReduction = options.OverlapReduction },
        Precision = options.Precision, ActivationCheckpointing = options.Recompute,
        GlobalBatch = options.GlobalBatch, MicroBatch = options.MicroBatch, SeqLen = options.SeqLen, Steps = options.Steps,
        Schedule = new LrSchedule { Kind = "cosine", PeakLr = options.Lr, MinLr = options.Lr / 10, WarmupSteps = Math.Min(30, options.Steps / 10) },
        CheckpointInterval = options.CheckpointInterval,
        MinWorkers = options.Pp, MaxWorkers = options.JobMaxWorkers, Seed = 1234,
        // A pipeline's replicas hold no whole model to score tasks with: its default job evaluates none. (Expert-parallel
        // replicas score together: each ep group one share, its MoE layers exchanging tokens as in training.)
        // An auto limit not sized yet (DefaultEvaluation.Size runs at submission) is validated at the most it can be.
        EvalTasks = options.Pp == 1 ? [.. options.EvalTasks] : [], EvalLimit = options.EvalLimit ?? DefaultEvaluation.MostExamples,
    };

    public static async Task<string> SubmitAsync(CoordinatorClient coordinator, AppHostOptions options, string datasetId, CancellationToken ct)
    {
        var status = await coordinator.SubmitAsync(Spec(options, datasetId, DateTime.UtcNow), ct);
        Log.AppHost($"submitted job {status.JobId}: {options.Preset}, {options.Steps} steps, global batch {options.GlobalBatch} x {options.SeqLen} tokens, " +
                    $"up to {options.JobMaxWorkers} workers{(options.Pp > 1 ? $", {options.Pp} pipeline stages per replica" : "")}");
        return status.JobId;
    }
}
