// The end of a job's run on rank 0: the validation loss, a sample from the job's prompt, and the trained model as a
// Hugging Face folder in the CheckpointStore (its step's hf export, not a folder on this disk); and the validation set
// every validation of the run reads.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Text.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// The dataset's validation split, opened on first use: the first <see cref="Evaluation.ClusterBatches"/> micro-batches
/// of it are what every validation of the job measures (between steps and at the end), whatever its layout.
/// </summary>
sealed class RunValidation(DataShards.DataShardsClient data, JobPlan plan) : IDisposable
{
    RemoteSampleSource? source;

    RemoteSampleSource Source => source ??= Open();

    /// <summary>
    /// Every call is bounded by <see cref="CallSilence.DefaultTimeout"/>: rank 0's validation at the end runs after the
    /// job's Stop, and a data service that stopped answering would otherwise hold it, silently, for ever.
    /// </summary>
    RemoteSampleSource Open()
    {
        GetManifestReply manifest;
        try { manifest = data.GetManifest(new GetManifestRequest { DatasetId = plan.Spec.Dataset }, deadline: DateTime.UtcNow + CallSilence.DefaultTimeout); }
        catch (Grpc.Core.RpcException e) when (e.StatusCode == Grpc.Core.StatusCode.DeadlineExceeded)
        {
            throw new IOException($"dataset {plan.Spec.Dataset}: the data service did not answer for the manifest within {CallSilence.DefaultTimeout.TotalSeconds:0} s (the validation split)", e);
        }
        return RemoteSampleSource.For(manifest, data, plan.Spec.Dataset, (ulong)plan.Spec.Seed, plan.Spec.SeqLen, (long)plan.Options.MicroBatch * Evaluation.ClusterBatches,
                                      CancellationToken.None, "validation", silenceTimeout: CallSilence.DefaultTimeout);
    }

    /// <summary>The trainer's validation loss (a pipeline's stages call it together).</summary>
    public double Evaluate(ITrainer trainer) => trainer.Evaluate(Source, Evaluation.ClusterBatches);

    /// <summary>The validation loss of a whole model (a pipeline's, loaded from its final checkpoint).</summary>
    public double Evaluate(DeepSeekForCausalLM model, Device device) =>
        Evaluation.LmLoss(model, Source, plan.Options.MicroBatch, device, Evaluation.ClusterBatches);

    public void Dispose() => source?.Dispose();
}

static class RunEnd
{
    /// <summary>
    /// The ranks that take part in a validation between steps: rank 0 with the whole model; in a pipeline, every stage of
    /// replica 0 (the loss is computed on the last stage and handed along to rank 0, which reports it); with expert
    /// parallelism every rank (of every stage), since a MoE layer's all-to-all spans its ep group and each rank holds only
    /// its experts (they all measure the same batches, and rank 0 reports the loss); with ZeRO-3 every rank too, since each
    /// layer gathers its parameters from every replica.
    /// </summary>
    public static bool Validates(Assignment a, JobPlan plan) => plan.Options.Ep > 1 || plan.Options.Zero >= 3 || (a.PpSize > 1 ? a.DpRank == 0 : a.Rank == 0);

    /// <summary>Rank 0 holds the whole model at the end: not a pipeline stage, not one expert shard, not ZeRO-3's rows.</summary>
    static bool HoldsWholeModel(Assignment a, JobPlan plan) => a.PpSize == 1 && plan.Options.Ep == 1 && plan.Options.Zero < 3;

    /// <summary>
    /// Rank 0 evaluates, samples and puts the model into the store (not cancelled by the job's Stop). With pp = 1 and
    /// ep = 1 it holds the whole model. A pipeline's rank 0 holds only stage 0, an expert-parallel one only its experts:
    /// the final checkpoint commits once every rank's file is reported (and the Coordinator stops the ranks only after
    /// that), so it waits for the commit until the run is cancelled and loads the whole model from it (any layout loads
    /// into one model). Without a committed final checkpoint there is no whole model to write: said, not guessed.
    /// </summary>
    public static void Finish(RunContext run, JobPlan plan, RunFormation formed, RunValidation validation, (long Step, double Loss)? last,
                              Device device, GetTokenizerReply tokenizer, CancellationToken boundary)
    {
        if (run.Rank != 0) return;
        double? reuse = last is { } l && l.Step == formed.Trainer.Step ? l.Loss : null;
        if (HoldsWholeModel(run.Assignment, plan))
        {
            Write(run, plan, formed.Live.Model, formed.Trainer.Step, reuse ?? Validate(run, () => validation.Evaluate(formed.Trainer)), device, tokenizer, Exports(formed));
            return;
        }
        if (formed.Trainer.Step < plan.Options.Steps) return;
        long final = plan.Options.Steps;
        run.Log($"waiting for the final checkpoint (step {final}) to commit, to load the whole model from it");
        run.Doing = $"waiting for the final checkpoint (step {final}) to commit";
        if (!WaitForCommit(run, formed.Store, final, boundary)) return;
        using var model = LoadWholeModel(run, formed.Store, final, plan.Config, device, tokenizer.TokenizerHash);
        if (model is null) return;
        Write(run, plan, model, final, reuse ?? Validate(run, () => validation.Evaluate(model, device)), device, tokenizer, Exports(formed));
    }

    /// <summary>The final validation loss; NaN, said in the log, when the data service could not serve the validation split.</summary>
    static double Validate(RunContext run, Func<double> evaluate)
    {
        run.Doing = "measuring the final validation loss";
        try { return evaluate(); }
        catch (IOException e)
        {
            run.Log($"no final validation loss: {e.Message}");
            return double.NaN;
        }
    }

    /// <summary>
    /// The whole model of committed step <paramref name="final"/>, whatever layout saved it; null, said in the log, when
    /// the store could not serve it. Every read of the store is bounded by its silence timeout (GrpcCheckpointStore): a
    /// store that stops answering ends the load with its name and the tensor asked for, rather than a rank 0 that waits
    /// silently for ever after the job's Stop.
    /// </summary>
    internal static DeepSeekForCausalLM? LoadWholeModel(RunContext run, GrpcCheckpointStore store, long final, DeepSeekConfig config, Device device, string tokenizerHash)
    {
        run.Log($"the final checkpoint (step {final}) is committed; loading the whole model from it");
        run.Doing = $"loading the whole model from committed step {final}";
        long loadStart = System.Diagnostics.Stopwatch.GetTimestamp();
        var model = new DeepSeekForCausalLM(config);
        try
        {
            model.to(device);
            var loaded = TrainingThread.Wait(ShardedCheckpointLoader.LoadReplicaAsync(store, final, model, null, tokenizerHash));
            run.Log($"loaded the whole model from committed step {final} (saved as dp {loaded.Layout.Dp} x pp {loaded.Layout.Pp}{(loaded.Layout.Ep > 1 ? $" x ep {loaded.Layout.Ep}" : "")}) in {ReplicaSync.Seconds(loadStart):0.###} s");
            return model;
        }
        catch (IOException e)
        {
            model.Dispose();
            run.Log($"could not load the whole model from committed step {final}, so there is no validation loss, sample or model from rank 0: {e.Message}");
            return null;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    static GrpcExportStore Exports(RunFormation formed) =>
        formed.Store.Exports ?? throw new InvalidOperationException("a cluster run's store has no export service: its final model has nowhere to go");

    /// <summary>Whether committed step <paramref name="final"/> appeared before the run was cancelled (looked at every 250 ms).</summary>
    internal static bool WaitForCommit(RunContext run, GrpcCheckpointStore store, long final, CancellationToken boundary)
    {
        while (true)
        {
            bool ending = boundary.IsCancellationRequested; // looked at before the store, so a commit before the Stop is seen
            // Each look has a deadline: a call that never answers (a store that stopped reading) would hold the end forever,
            // and the run's cancellation cannot end it, since the end runs after the job's Stop.
            using var look = new CancellationTokenSource(ListTimeout);
            try
            {
                if (TrainingThread.Wait(store.ListStepsAsync(look.Token)).Contains(final)) return true;
            }
            catch (Exception e) when (look.IsCancellationRequested && e is Grpc.Core.RpcException or OperationCanceledException)
            {
                run.Log($"the checkpoint store did not list the committed checkpoints within {ListTimeout.TotalSeconds:0} s; asking again");
            }
            // The store's client names the store and the call (IOException); a bare RpcException would be a transport's.
            catch (Exception e) when (e is IOException or Grpc.Core.RpcException) { run.Log($"could not list the committed checkpoints: {e.Message}"); }
            if (ending)
            {
                run.Log($"the final checkpoint (step {final}) is not committed and the run ended: no validation loss, sample or model from rank 0");
                return false;
            }
            boundary.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(250));
        }
    }

    /// <summary>The longest one look at the committed checkpoints may take.</summary>
    static readonly TimeSpan ListTimeout = TimeSpan.FromSeconds(30);

    /// <summary>Logs the validation loss and a sample from the job's prompt, and puts <paramref name="model"/> into the store as its step's hf export.</summary>
    static void Write(RunContext run, JobPlan plan, DeepSeekForCausalLM model, long step, double validationLoss, Device device, GetTokenizerReply tokenizerReply,
                      GrpcExportStore exports)
    {
        var tokenizer = BpeTokenizer.FromJson(tokenizerReply.TokenizerJson, $"dataset {plan.Spec.Dataset}");
        if (double.IsFinite(validationLoss))
        {
            run.Metrics?.ValidationLoss(run.JobId, run.WorkerId, validationLoss);
            run.Log($"validation loss {validationLoss:F4} nats/token, perplexity {Math.Exp(validationLoss):F1}");
        }
        // The end's validation joins the job's curve (a report of no samples: the ledger and the loss curve ignore it).
        run.Send(new WorkerMessage
        {
            Step = new StepReport
            {
                Generation = run.Assignment.Generation, Rank = run.Rank, Step = step,
                ValidationLoss = validationLoss, HasValidation = double.IsFinite(validationLoss),
            },
        });
        run.Doing = "generating the sample";
        string promptText = plan.Spec.SamplePrompt;
        var prompt = tokenizer.Encode(promptText);
        // An empty prompt starts from the end-of-text token, as the standalone run does.
        if (prompt.Length == 0 && tokenizer.EosTokenId is { } eos) prompt = [eos];
        var sample = TextGenerator.Generate(model, prompt, new SamplingOptions
        {
            MaxNewTokens = 40, Temperature = 0.8, TopP = 0.95, Seed = plan.Spec.Seed, EosTokenId = tokenizer.EosTokenId,
        }, device);
        run.Log($"sample: {(promptText + tokenizer.Decode(sample)).ReplaceLineEndings(" ")}");
        run.Doing = $"putting the model of step {step} into the checkpoint store";
        if (PutIntoStore(run, exports, model, tokenizer, step) is { } place)
            run.Send(new WorkerMessage { ModelSaved = new ModelSaved { Generation = run.Assignment.Generation, Step = step, Path = place } });
    }

    /// <summary>
    /// The model goes to the store only, as the hf export of its step (exports/{job}/{step}/hf), where any machine
    /// downloads it: written into a staging folder on this disk, uploaded with its hashes, and the folder deleted either
    /// way. Returns the place, or null (logged) when the store refused it; a step exported before (an earlier end of the
    /// same run, a POST /jobs/{id}/exports) is that place already.
    /// </summary>
    static string? PutIntoStore(RunContext run, GrpcExportStore exports, DeepSeekForCausalLM model, BpeTokenizer tokenizer, long step)
    {
        string place = $"exports/{run.JobId}/{step}/hf";
        try
        {
            if (TrainingThread.Wait(exports.ListAsync(run.JobId)).Any(e => e.Export.Step == step && e.Export.Format == "hf"))
            {
                run.Log($"the model of step {step} is in the checkpoint store already as {place}");
                return place;
            }
        }
        catch (Grpc.Core.RpcException e) { run.Log($"could not list the exports of job '{run.JobId}': {e.Status.StatusCode}: {e.Status.Detail}"); }
        catch (IOException e) { run.Log($"could not list the exports of job '{run.JobId}': {e.Message}"); }
        var staging = Path.Combine(run.Settings.OutputDir, "final-model-staging", run.WorkerId, $"{run.JobId}-{step}");
        try
        {
            if (Directory.Exists(staging)) Directory.Delete(staging, recursive: true); // a crashed earlier end's leftovers
            HfModelFolder.Save(staging, model, tokenizer);
            var manifest = ModelExport.Describe(staging, "hf", run.JobId, step, $"final model of job '{run.JobId}' (rank 0, generation {run.Assignment.Generation})", tokenizer.Hash);
            string key = TrainingThread.Wait(exports.UploadAsync(staging, manifest));
            run.Log($"model saved to the checkpoint store as {place} ({key})");
            return place;
        }
        catch (IOException e)
        {
            run.Log($"could not put the model into the checkpoint store, so this run leaves no model: {e.Message}");
            return null;
        }
        finally
        {
            if (Directory.Exists(staging)) Directory.Delete(staging, recursive: true);
        }
    }
}
