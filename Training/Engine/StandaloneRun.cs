// Standalone training in one process: text -> tokenizer -> packed samples -> trainer loop -> HF model folder.
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Perf;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public sealed record StandaloneSpec
{
    /// <summary>Model shape; vocab_size is replaced by the tokenizer's.</summary>
    public required DeepSeekConfig Model { get; init; }
    /// <summary>Text files or folders; empty means the shipped King James Bible corpus.</summary>
    public IReadOnlyList<string> Data { get; init; } = [];
    /// <summary>An existing tokenizer.json; otherwise one is trained with <see cref="VocabSize"/> entries.</summary>
    public string? TokenizerPath { get; init; }
    public int? VocabSize { get; init; }
    public required string OutputDir { get; init; }
    public TrainingOptions Options { get; init; } = new();
    /// <summary>Continue from the newest checkpoint in OutputDir/checkpoints when there is one.</summary>
    public bool Resume { get; init; } = true;
    public double ValidationFraction { get; init; } = 0.05;
    /// <summary>The device's peak (FLOP/s) for MFU, set by --peak-gflops; 0: the declared GPU peak or the CPU's cached calibration.</summary>
    public double PeakFlops { get; init; }
    /// <summary>A Hugging Face model folder whose weights the run starts from (FP8 blocks dequantized) instead of the seed's.</summary>
    public string? InitFrom { get; init; }
    public string SamplePrompt { get; init; } = "In the beginning";
    public int SampleTokens { get; init; } = 40;
}

public sealed record StandaloneResult(
    double ValidationLoss, double UnigramLoss, IReadOnlyList<StepMetrics> History, IReadOnlyList<(long step, double loss)> Validation,
    string ModelDir, string Sample, long ResumedFromStep);

public static class StandaloneRun
{
    public static Device ResolveDevice(string name) => name switch
    {
        "auto" => cuda.is_available() ? CUDA : CPU,
        "cpu" => CPU,
        _ when name.StartsWith("cuda", StringComparison.Ordinal) =>
            cuda.is_available() ? new Device(name) : throw new ArgumentException($"device '{name}' was asked for, but CUDA is not available in this build or on this machine (TorchSharp-cpu is the default: build with -p:TorchBackend=cuda)"),
        _ => throw new ArgumentException($"unknown device '{name}': expected auto, cpu, cuda or cuda:N"),
    };

    public static StandaloneResult Run(StandaloneSpec spec, ConsoleProgress? progress = null)
    {
        progress ??= new ConsoleProgress();
        var options = spec.Options.Validated();
        var device = ResolveDevice(options.Device);
        Directory.CreateDirectory(spec.OutputDir);
        var checkpoints = Path.Combine(spec.OutputDir, "checkpoints");

        // ---- Data and tokenizer ----
        var docs = spec.Data.Count == 0 ? ShippedCorpus.Documents().ToList() : TextCorpus.Documents(spec.Data).ToList();
        if (docs.Count == 0) throw new InvalidDataException("The training data holds no document (all files are empty).");
        var (trainDocs, valDocs) = ShippedCorpus.Split(docs, spec.ValidationFraction, (int)options.Seed);
        progress.Line($"data: {docs.Count} documents ({trainDocs.Count} train, {valDocs.Count} validation), {docs.Sum(d => (long)d.Length) / 1e6:F1} M characters" +
                      (spec.Data.Count == 0 ? " from the shipped King James Bible corpus" : ""));
        var tokenizer = LoadOrTrainTokenizer(spec, trainDocs, progress);
        int eot = tokenizer.EosTokenId ?? throw new InvalidDataException("the tokenizer has no end-of-text token to join documents with");
        var train = TokenDataset.Pack(trainDocs.Select(d => tokenizer.Encode(d)), eot, options.SeqLen);
        var validation = TokenDataset.Pack(valDocs.Select(d => tokenizer.Encode(d)), eot, options.SeqLen);
        double unigram = UnigramLoss(train, validation, tokenizer.VocabSize);
        progress.Line($"tokens: {train.TokenCount:N0} train ({train.SampleCount:N0} samples of {options.SeqLen + 1}), {validation.TokenCount:N0} validation; unigram baseline {unigram:F3} nats/token");

        // ---- Model, trainer, resume ----
        // From pretrained weights the embedding keeps the folder's rows (vocab_size may be padded beyond the tokenizer's).
        int vocab = spec.InitFrom is null ? tokenizer.VocabSize : Math.Max(spec.Model.VocabSize, tokenizer.VocabSize);
        var config = (spec.Model with { VocabSize = vocab, BosTokenId = tokenizer.BosTokenId, EosTokenId = eot }).Validated();
        using var model = DeepSeekForCausalLM.FromSeed(config, options.Seed); // the weights a cluster job of this seed starts from
        if (spec.InitFrom is { } pretrained)
        {
            PretrainedWeights.LoadInto(model, pretrained);
            progress.Line($"initFrom: the model starts from the weights of {pretrained}");
        }
        if (options.Precision == "bf16") model.to(ScalarType.BFloat16);
        model.to(device);
        var peak = HardwarePeak.For(device, options.Precision == "bf16" ? ScalarType.BFloat16 : ScalarType.Float32,
                                    spec.PeakFlops > 0 ? PeakSettings.FromGflops(spec.PeakFlops / 1e9, "--peak-gflops") : PeakSettings.Default, progress.Line);
        progress.Line($"model: {config.ParameterCount() / 1e6:F2} M parameters ({config.ParameterCount(activeOnly: true) / 1e6:F2} M active) + {config.MtpParameterCount() / 1e6:F2} M MTP, " +
                      $"{config.NumHiddenLayers} layers, {config.NRoutedExperts} experts (top {config.NumExpertsPerTok}); device {device.type}, {options.Precision}");
        using var trainer = new Trainer(model, train, validation, options, device, peak);
        long resumedFrom = 0;
        if (spec.Resume && TrainingCheckpoint.Latest(checkpoints) is { } latest)
        {
            var state = TrainingCheckpoint.Load(latest, trainer, tokenizer.Hash);
            resumedFrom = state.Step;
            progress.Line($"resumed from {latest} (step {state.Step}, {state.ConsumedSamples} samples consumed)");
        }

        // ---- The loop ----
        var history = new List<StepMetrics>();
        var valHistory = new List<(long, double)>();
        while (trainer.Step < options.Steps)
        {
            var m = trainer.TrainStep();
            history.Add(m);
            string? extra = null;
            if (options.EvalEvery > 0 && (m.Step % options.EvalEvery == 0 || m.Step == options.Steps))
            {
                double v = trainer.Evaluate();
                valHistory.Add((m.Step, v));
                extra = $"val {v:F4} (ppl {Math.Exp(v):F1})";
            }
            progress.Step(m, options.Steps, 1, options.LogEvery, extra);
            if (options.CheckpointEvery > 0 && m.Step % options.CheckpointEvery == 0)
                progress.Line($"checkpoint: {TrainingCheckpoint.Save(checkpoints, trainer, tokenizer.Hash)}");
        }

        // ---- Result ----
        double finalVal = valHistory.Count > 0 && valHistory[^1].Item1 == trainer.Step ? valHistory[^1].Item2 : trainer.Evaluate();
        var modelDir = Path.Combine(spec.OutputDir, "model");
        HfModelFolder.Save(modelDir, model, tokenizer);
        var prompt = tokenizer.Encode(spec.SamplePrompt);
        var sampleIds = TextGenerator.Generate(model, prompt.Length > 0 ? prompt : [eot],
            new SamplingOptions { MaxNewTokens = spec.SampleTokens, Temperature = 0.8, TopP = 0.95, Seed = options.Seed, EosTokenId = eot });
        var sample = spec.SamplePrompt + tokenizer.Decode(sampleIds);
        progress.Line($"validation loss {finalVal:F4} nats/token, perplexity {Math.Exp(finalVal):F1} (unigram baseline {unigram:F3}, perplexity {Math.Exp(unigram):F1})");
        progress.Line($"model saved to {modelDir}");
        progress.Line($"sample: {sample.ReplaceLineEndings(" ")}");
        return new StandaloneResult(finalVal, unigram, history, valHistory, modelDir, sample, resumedFrom);
    }

    static BpeTokenizer LoadOrTrainTokenizer(StandaloneSpec spec, IReadOnlyList<string> trainDocs, ConsoleProgress progress)
    {
        if (spec.TokenizerPath is { } path)
        {
            var loaded = BpeTokenizer.Load(path);
            progress.Line($"tokenizer: {path} ({loaded.VocabSize} tokens)");
            return loaded;
        }
        int vocab = spec.VocabSize ?? spec.Model.VocabSize;
        var cached = Path.Combine(spec.OutputDir, "tokenizer.json");
        if (File.Exists(cached))
        {
            var t = BpeTokenizer.Load(cached);
            if (t.VocabSize == vocab) { progress.Line($"tokenizer: {cached} ({t.VocabSize} tokens, trained earlier)"); return t; }
        }
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var trained = BpeTokenizer.Train(trainDocs, vocab);
        trained.Save(cached);
        progress.Line($"tokenizer: trained {trained.VocabSize} byte-level BPE tokens in {sw.Elapsed.TotalSeconds:F1} s -> {cached}");
        return trained;
    }

    /// <summary>Cross-entropy of the validation targets under the training set's add-one-smoothed unigram distribution.</summary>
    public static double UnigramLoss(TokenDataset train, TokenDataset validation, int vocab)
    {
        var counts = new double[vocab];
        for (long s = 0; s < train.SampleCount; s++) foreach (var t in train.Sample(s)[1..]) counts[t]++;
        double total = counts.Sum() + vocab;
        double nll = 0;
        long n = 0;
        for (long s = 0; s < validation.SampleCount; s++)
            foreach (var t in validation.Sample(s)[1..]) { nll -= Math.Log((counts[t] + 1) / total); n++; }
        return n == 0 ? double.NaN : nll / n;
    }
}
