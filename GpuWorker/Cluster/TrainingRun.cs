// One generation's training on this worker: model, data from DataShardService, tcp/nccl collectives, checkpoints to CheckpointStore.
using System.Text.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using Assignment = DeepSeekCluster.Contracts.Control.Assignment;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Perf;
using DeepSeekCluster.Training.Tokenization;
using Grpc.Net.Client;
using TorchSharp;
using static TorchSharp.torch;
using CheckpointStoreClient = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class TrainingRun(Assignment assignment, WorkerSettings settings, int collectivePort, Action<WorkerMessage> send,
                                WorkerProgress progress, TextWriter log, TrainingMetrics? metrics = null)
{
    static readonly JsonSerializerOptions SpecJson = new(JsonSerializerDefaults.Web)
    {
        Converters = { new System.Text.Json.Serialization.JsonStringEnumConverter() },
    };

    readonly CancellationTokenSource cancel = new();
    readonly System.Collections.Concurrent.ConcurrentDictionary<long, string> manifests = new();
    long checkpointRequested = -1;

    public void Cancel() => cancel.Cancel();
    public void RequestCheckpoint(long step) => Interlocked.Exchange(ref checkpointRequested, step);

    /// <summary>Runs to the job's last step, a cancellation (new generation, stop), or a failure reported as Leaving(failed).</summary>
    public void Run()
    {
        try { RunCore(cancel.Token); }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested) { Log("run cancelled"); }
        catch (CollectiveException e) when (cancel.IsCancellationRequested) { Log($"run cancelled ({e.Failure})"); }
        catch (CollectiveException e)
        {
            // A peer died or stalled: the coordinator re-forms the generation; this worker waits for its next assignment.
            Log($"collective failed: {e.Message}");
        }
        catch (Exception e)
        {
            Log($"training failed: {e}");
            send(new WorkerMessage { Leaving = new Leaving { Reason = $"rank {assignment.Rank}: {e.Message}", Failed = true, Generation = assignment.Generation } });
        }
    }

    void RunCore(CancellationToken ct)
    {
        var spec = JsonSerializer.Deserialize<JobSpec>(assignment.JobSpecJson, SpecJson)
                   ?? throw new InvalidDataException("the assignment carries no job spec");
        var device = StandaloneRun.ResolveDevice(settings.Device);
        using var dataChannel = GrpcChannel.ForAddress(settings.DataShards);
        using var storeChannel = GrpcChannel.ForAddress(settings.Checkpoints);
        var data = new DataShards.DataShardsClient(dataChannel);

        // ---- Data and model ----
        var manifest = data.GetManifest(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var tokenizerReply = data.GetTokenizer(new GetManifestRequest { DatasetId = spec.Dataset }, cancellationToken: ct);
        var baseConfig = spec.ModelConfigJson is { Length: > 0 } json ? DeepSeekConfig.FromJson(json, "job spec modelConfigJson") : DeepSeekConfig.Preset(spec.ModelPreset!);
        var config = (baseConfig with { VocabSize = manifest.VocabSize, EosTokenId = tokenizerReply.EotTokenId }).Validated();
        var options = new TrainingOptions
        {
            SeqLen = spec.SeqLen, GlobalBatch = spec.GlobalBatch, MicroBatch = spec.MicroBatch, Steps = spec.Steps,
            Lr = spec.Schedule.PeakLr, Schedule = spec.Schedule.Kind, WarmupSteps = spec.Schedule.WarmupSteps,
            MinLrRatio = spec.Schedule.PeakLr > 0 ? spec.Schedule.MinLr / spec.Schedule.PeakLr : 0.1,
            Seed = spec.Seed, CheckpointEvery = spec.CheckpointInterval, EvalEvery = 0,
        }.Validated(assignment.DpSize);
        var source = RemoteSampleSource.OpenAsync(data, spec.Dataset, (ulong)spec.Seed, spec.SeqLen, (long)spec.Steps * spec.GlobalBatch, ct)
            .GetAwaiter().GetResult();
        manual_seed(spec.Seed); // every replica starts from the same weights
        using var model = new DeepSeekForCausalLM(config).InitializeWeights();
        model.to(device);

        // ---- Collectives: the ring of this generation ----
        var peers = Enumerable.Range(0, assignment.World).Select(r => assignment.Peers.TryGetValue(r, out var e) ? e
            : throw new InvalidDataException($"the assignment lists no endpoint for rank {r}")).ToList();
        using var rendezvous = new TcpRendezvous(assignment.JobId, assignment.Generation, assignment.Rank, assignment.World,
                                                 new System.Net.IPEndPoint(System.Net.IPAddress.Any, collectivePort));
        using var collective = rendezvous.Connect(peers, new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(30) });
        using var reducer = new BucketedGradientReducer(collective);
        double peak = MatmulPeak.Measure(device, ScalarType.Float32, 512, TimeSpan.FromMilliseconds(300)).FlopsPerSecond;
        using var trainer = new Trainer(model, source, null, options, device, peak, assignment.DpRank, assignment.DpSize, reducer);
        Log($"generation {assignment.Generation}: rank {assignment.Rank} of {assignment.World}, {config.ParameterCount() / 1e6:F2} M parameters, " +
            $"global batch {options.GlobalBatch} = {assignment.DpSize} x {options.MicroBatch} x {options.Accumulation(assignment.DpSize)} accumulation");

        // ---- Checkpoints ----
        var store = new GrpcCheckpointStore(new CheckpointStoreClient(storeChannel), settings.Checkpoints.ToString(), assignment.JobId,
                                            Path.Combine(settings.OutputDir, "staging", settings.WorkerId));
        if (assignment.ResumeStep > 0)
        {
            var loaded = ShardedCheckpointLoader.LoadReplicaAsync(store, assignment.ResumeStep, model, trainer.Optimizer, tokenizerReply.TokenizerHash, ct)
                .GetAwaiter().GetResult();
            trainer.ResumeAt(loaded.Step, loaded.OptimizerSteps);
            Log($"resumed from committed step {loaded.Step} (generation {loaded.Generation}, {loaded.ConsumedSamples} samples consumed)");
        }
        var layout = ParallelLayout.Even(assignment.DpSize, 1, config.NumHiddenLayers);
        var plan = new ShardingPlan(layout, CheckpointTensors.Catalog(CheckpointTensors.Collect(model, trainer.Optimizer)));
        var saver = new AsyncCheckpointSaver(store, plan, assignment.Rank, (outcome, token) =>
        {
            if (outcome.File is { } f)
                send(new WorkerMessage
                {
                    Checkpoint = new CheckpointReport
                    {
                        Generation = assignment.Generation, Step = outcome.Step, Rank = assignment.Rank, File = f.Name,
                        SizeBytes = f.Size, Sha256 = f.Sha256,
                        ManifestJson = manifests.TryRemove(outcome.Step, out var mj) ? mj : "",
                    },
                });
            else Log($"checkpoint of step {outcome.Step} failed: {outcome.Error?.Message}");
            return Task.CompletedTask;
        });

        // ---- The loop ----
        progress.Generation = assignment.Generation;
        while (trainer.Step < options.Steps)
        {
            ct.ThrowIfCancellationRequested();
            var m = trainer.TrainStep();
            progress.Step = m.Step; progress.Loss = m.Loss; progress.TokensPerSecond = m.TokensPerSecond;
            metrics?.Record(assignment.JobId, settings.WorkerId, m, (long)options.GlobalBatch / assignment.DpSize * options.SeqLen);
            send(new WorkerMessage
            {
                Step = new StepReport
                {
                    Generation = assignment.Generation, Rank = assignment.Rank, Step = m.Step, Loss = m.Loss,
                    TokensPerSecond = m.TokensPerSecond * assignment.DpSize, LearningRate = m.LearningRate,
                },
            });
            if (assignment.Rank == 0 && (m.Step % 10 == 0 || m.Step == options.Steps || m.Step == 1))
                Log(ConsoleProgress.Format(m, options.Steps, assignment.World, TimeSpan.Zero).Split(" | ETA")[0]);
            bool due = options.CheckpointEvery > 0 && m.Step % options.CheckpointEvery == 0 || m.Step == options.Steps
                       || Interlocked.Exchange(ref checkpointRequested, -1) == m.Step;
            if (due)
            {
                var tensors = CheckpointTensors.Collect(model, trainer.Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value);
                if (assignment.Rank == 0)
                    manifests[m.Step] = GrpcCheckpointStore.ManifestJsonForReport(assignment.JobId, plan,
                        new CheckpointPosition(trainer.Step, assignment.Generation, trainer.ConsumedSamples, trainer.Optimizer.StepCount),
                        config.ToJson(), tokenizerReply.TokenizerHash);
                var request = saver.Save(m.Step, tensors);
                if (request.PreviousFailure is { } failure) Log($"an earlier checkpoint failed: {failure.Message}");
                if (m.Step == options.Steps && !request.Started)
                {
                    saver.WaitAsync().GetAwaiter().GetResult();
                    saver.Save(m.Step, tensors); // the final state must be saved even if the previous save was still running
                }
            }
        }
        if (saver.WaitAsync().GetAwaiter().GetResult() is { } last) Log($"the last checkpoint failed: {last.Message}");
        saver.DisposeAsync().AsTask().GetAwaiter().GetResult();

        // ---- The end: rank 0 evaluates, samples and writes the model folder (not cancelled by the job's Stop) ----
        ct = CancellationToken.None;
        if (assignment.Rank == 0)
        {
            var tokenizer = BpeTokenizer.FromJson(tokenizerReply.TokenizerJson, $"dataset {spec.Dataset}");
            var validation = RemoteSampleSource.OpenAsync(data, spec.Dataset, (ulong)spec.Seed, spec.SeqLen, options.MicroBatch * 4L, ct, "validation")
                .GetAwaiter().GetResult();
            double val = trainer.EvaluateOn(validation, 4);
            Log($"validation loss {val:F4} nats/token, perplexity {Math.Exp(val):F1}");
            var prompt = tokenizer.Encode("In the beginning");
            var sample = TextGenerator.Generate(model, prompt, new SamplingOptions
            {
                MaxNewTokens = 40, Temperature = 0.8, TopP = 0.95, Seed = spec.Seed, EosTokenId = tokenizer.EosTokenId,
            }, device);
            Log($"sample: In the beginning{tokenizer.Decode(sample).ReplaceLineEndings(" ")}");
            var dir = Path.Combine(settings.OutputDir, assignment.JobId, "model");
            HfModelFolder.Save(dir, model, tokenizer);
            Log($"model saved to {Path.GetFullPath(dir)}");
        }
    }

    void Log(string message) { lock (log) log.WriteLine($"[rank {assignment.Rank}] {message}"); }
}
