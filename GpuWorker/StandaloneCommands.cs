// The standalone verbs: train a model in this process, generate text from a saved HF model folder (or one in the store), export a checkpoint or folder.
using System.Text.Json;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.GpuWorker;

public static class StandaloneCommands
{
    public const string Usage = """
        usage:
          gpu-worker [join]
              Cluster mode: connects to the Coordinator named by services__coordinator__grpc__0 (with
              services__data-shards__grpc__0, services__checkpoints__grpc__0 and Cluster__Token) and trains
              what it is assigned. The default when those variables are set.
          gpu-worker train [--preset tiny|small|deepseek-v2-lite|deepseek-v3] [--config config.json]
                           [--data FILE_OR_DIR ...] [--tokenizer tokenizer.json] [--vocab-size N]
                           [--out DIR] [--steps N] [--seq-len N] [--global-batch N] [--micro-batch N]
                           [--lr X] [--schedule cosine|wsd|constant] [--warmup N] [--min-lr-ratio X]
                           [--weight-decay X] [--clip X] [--mtp-weight X] [--bias-update-speed X]
                           [--precision fp32|bf16] [--recompute none|full|selective] [--experts auto|grouped|per-expert] [--device auto|cpu|cuda] [--seed N]
                           [--eval-every N] [--eval-batches N] [--log-every N] [--checkpoint-every N]
                           [--fresh] [--peak-gflops X] [--init-from HF_DIR]
              Trains without the cluster. Default: the tiny preset on the shipped King James Bible corpus,
              600 steps, output in runs/standalone. --warmup defaults to min(30, steps / 10). Text files: documents are separated by empty lines.
              Checkpoints go to DIR/checkpoints/standalone/NNNNNNNN (the cluster's sharded format, one rank);
              resumes from the newest unless --fresh. Writes a Hugging Face folder to DIR/model.
              --init-from starts from a Hugging Face folder's weights (ours or transformers', FP8 blocks dequantized)
              and takes its config.json and tokenizer.json.
          gpu-worker generate (--model DIR | --store URL --job NAME --step N [--format hf|hf-bf16])
                              [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N] [--greedy]
                              [--temperature X] [--top-p X] [--seed N] [--json] [--no-cache]
              Continues a prompt with a model folder (config.json + *.safetensors [+ tokenizer.json]), or with an
              export in the CheckpointStore service at URL (a cluster job's final model is exports/{job}/{steps}/hf),
              downloaded with every file's SHA-256 checked into a temporary folder (the cluster token from
              Cluster__Token when set).
              --prompt-ids gives token ids directly (no tokenizer needed).
              --json prints {"prompt_ids": [...], "generated_ids": [...], "text": "..."}.
          gpu-worker export --format hf|hf-bf16|gguf-f16|gguf-q8_0|gguf-q4_0|onnx
                            (--checkpoints ROOT [--job NAME] [--step N] --tokenizer tokenizer.json [--exports DIR]
                             | --store URL --job NAME [--step N] --tokenizer tokenizer.json
                             | --model DIR --out DIR)
              Exports a committed checkpoint of any layout (default: job standalone, its newest step) into
              DIR/{job}/{step}/{format}/ (DIR defaults to ROOT/exports); with --store, from the CheckpointStore
              service at URL into its exports/{job}/{step}/{format}/; or an HF model folder into --out. Each export
              has an export.json listing every file's size and SHA-256. GGUF is llama.cpp's deepseek2 (model.gguf);
              onnx is model.onnx (whole sequence) and decode.onnx (a step over the MLA latent cache).
              Nothing is left behind when it fails; an existing export is never overwritten.
          gpu-worker export --store URL --download --job NAME --step N --format F --out DIR
              Downloads a committed export from the store into DIR, checking every file's SHA-256.
        """;

    public static int Train(string[] args)
    {
        StandaloneRun.Run(ParseTrain(args));
        return 0;
    }

    /// <summary>The train verb's options, validated (nothing is loaded or trained yet).</summary>
    public static StandaloneSpec ParseTrain(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string> { "fresh" });
        var initFrom = cl.String("init-from");
        if (initFrom is not null && (cl.String("config") ?? cl.String("preset")) is not null)
            throw new ArgumentException("option --init-from takes the model's shape from its config.json: leave out --config and --preset");
        var config = initFrom is not null ? DeepSeekConfig.Load(Path.Combine(initFrom, HfModelFolder.ConfigFile))
            : cl.String("config") is { } path ? DeepSeekConfig.Load(path) : DeepSeekConfig.Preset(cl.String("preset") ?? "tiny");
        var d = new TrainingOptions();
        var options = new TrainingOptions
        {
            Steps = cl.Get("steps", d.Steps), SeqLen = cl.Get("seq-len", d.SeqLen), GlobalBatch = cl.Get("global-batch", d.GlobalBatch),
            MicroBatch = cl.Get("micro-batch", d.MicroBatch), Lr = cl.Get("lr", d.Lr), Schedule = cl.String("schedule") ?? d.Schedule,
            MinLrRatio = cl.Get("min-lr-ratio", d.MinLrRatio),
            WeightDecay = cl.Get("weight-decay", d.WeightDecay), ClipNorm = cl.Get("clip", d.ClipNorm),
            MtpWeight = cl.Get("mtp-weight", d.MtpWeight), BiasUpdateSpeed = cl.Get("bias-update-speed", d.BiasUpdateSpeed),
            Precision = cl.String("precision") ?? d.Precision, Recompute = cl.String("recompute") ?? d.Recompute, Experts = cl.String("experts") ?? d.Experts, Device = cl.String("device") ?? d.Device, Seed = cl.Get("seed", d.Seed),
            EvalEvery = cl.Get("eval-every", d.EvalEvery), EvalBatches = cl.Get("eval-batches", d.EvalBatches),
            LogEvery = cl.Get("log-every", d.LogEvery), CheckpointEvery = cl.Get("checkpoint-every", 100),
        };
        // Unset, the warmup follows --steps (TrainingOptions.DefaultWarmup); given, it is checked as typed.
        if (cl.String("warmup") is not null) options = options with { WarmupSteps = cl.Get("warmup", 0L) };
        var spec = new StandaloneSpec
        {
            Model = config, Data = cl.Strings("data"), InitFrom = initFrom,
            // A pretrained model keeps its own tokenizer when it has one.
            TokenizerPath = cl.String("tokenizer") ?? (initFrom is not null && File.Exists(Path.Combine(initFrom, HfModelFolder.TokenizerFile)) ? Path.Combine(initFrom, HfModelFolder.TokenizerFile) : null),
            VocabSize = cl.String("vocab-size") is null ? null : cl.Get("vocab-size", 0),
            OutputDir = cl.String("out") ?? Path.Combine("runs", "standalone"), Options = options.Validated(),
            Resume = !cl.Flag("fresh"), PeakFlops = cl.Get("peak-gflops", 0.0) * 1e9,
        };
        cl.RejectUnknown();
        return spec;
    }

    public static int Generate(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string> { "greedy", "json", "no-cache" });
        var dir = cl.String("model");
        var storeUrl = cl.String("store");
        if ((dir is null) == (storeUrl is null))
            throw new ArgumentException("exactly one of --model DIR (a folder with config.json, model.safetensors and tokenizer.json) and --store URL --job NAME --step N (an hf export in the CheckpointStore) is required");
        (Uri Store, Contracts.Checkpoints.ExportKey Key)? fromStore = storeUrl is null ? null : StoreExport.ExportOf(cl, storeUrl, "hf");
        if (fromStore is { Key.Format: not ("hf" or "hf-bf16") } other)
            throw new ArgumentException($"--format {other.Key.Format}: generate loads a Hugging Face export, hf or hf-bf16");
        var prompt = cl.String("prompt") ?? "";
        var promptIds = cl.String("prompt-ids");
        var sampling = new SamplingOptions
        {
            MaxNewTokens = cl.Get("max-new-tokens", 32), Temperature = cl.Flag("greedy") ? 0 : cl.Get("temperature", 0.8),
            TopP = cl.Get("top-p", 0.95), Seed = cl.Get("seed", 0L), NoCache = cl.Flag("no-cache"),
        };
        bool json = cl.Flag("json");
        var device = StandaloneRun.ResolveDevice(cl.String("device") ?? "auto");
        cl.RejectUnknown();

        string? downloaded = null;
        if (fromStore is { } export)
        {
            downloaded = Directory.CreateTempSubdirectory("gpu-worker-generate-").FullName;
            dir = Path.Combine(downloaded, "model");
            StoreExport.Download(export.Store, export.Key, dir);
        }
        try { return Generate(dir!, prompt, promptIds, sampling, json, device); }
        finally { if (downloaded is not null) Directory.Delete(downloaded, recursive: true); }
    }

    static int Generate(string dir, string prompt, string? promptIds, SamplingOptions sampling, bool json, TorchSharp.torch.Device device)
    {
        var loaded = HfModelFolder.Load(dir, device);
        using var model = loaded.Model;
        var tokenizer = loaded.Tokenizer;
        int[] ids;
        if (promptIds is not null)
            ids = promptIds.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(ParseId).ToArray();
        else
        {
            if (tokenizer is null) throw new FileNotFoundException($"Model folder '{dir}' has no tokenizer.json: give the prompt as --prompt-ids.");
            ids = tokenizer.Encode(prompt, addSpecialTokens: true);
        }
        if (ids.Length == 0)
            ids = [tokenizer?.BosTokenId ?? model.Config.BosTokenId ?? throw new ArgumentException("the prompt is empty and the model has no BOS token to start from")];
        if (ids.FirstOrDefault(i => i >= model.Config.VocabSize) is var tooBig && tooBig >= model.Config.VocabSize)
            throw new ArgumentException($"--prompt-ids: token {tooBig} is outside the vocabulary (vocab_size {model.Config.VocabSize})");
        var generated = TextGenerator.Generate(model, ids, sampling with { EosTokenId = tokenizer?.EosTokenId ?? model.Config.EosTokenId }, device);
        var text = tokenizer?.Decode(generated);
        if (json)
            Console.WriteLine(JsonSerializer.Serialize(new { prompt_ids = ids, generated_ids = generated, text }));
        else
            Console.WriteLine(text is null ? string.Join(" ", generated) : prompt + text);
        return 0;
    }

    public static int Export(string[] args)
    {
        var cl = new CommandLine(args, new HashSet<string> { "download" });
        var format = ModelExport.CheckFormat(cl.String("format") ?? throw new ArgumentException($"option --format is required: one of {string.Join(", ", ModelExport.Formats)}"));
        var model = cl.String("model");
        var checkpoints = cl.String("checkpoints");
        var storeUrl = cl.String("store");
        if (new[] { model, checkpoints, storeUrl }.Count(o => o is not null) != 1)
            throw new ArgumentException("give exactly one of --checkpoints ROOT (a checkpoint folder), --store URL (the CheckpointStore service) or --model DIR (an HF folder)");
        if (storeUrl is not null) return StoreExport.Run(cl, storeUrl, format);
        string folder;
        ExportManifest manifest;
        if (model is not null)
        {
            folder = cl.String("out") ?? throw new ArgumentException("option --out DIR is required with --model");
            cl.RejectUnknown();
            manifest = ModelExport.FromModelFolder(model, format, folder);
        }
        else
        {
            string job = cl.String("job") ?? TrainingCheckpoint.Job;
            long? step = cl.String("step") is null ? null : cl.Get("step", 0L);
            var tokenizerPath = cl.String("tokenizer") ?? throw new ArgumentException("option --tokenizer FILE is required with --checkpoints: the tokenizer.json the checkpoint was trained with");
            var exports = cl.String("exports") ?? Path.Combine(checkpoints!, "exports");
            cl.RejectUnknown();
            if (!Directory.Exists(Path.Combine(checkpoints!, job))) throw new DirectoryNotFoundException($"--checkpoints {checkpoints}: no folder for job '{job}'");
            using var store = new FolderCheckpointStore(checkpoints!, job);
            (folder, manifest) = ModelExport.FromCheckpointAsync(store, step, BpeTokenizer.Load(tokenizerPath), format, exports).GetAwaiter().GetResult();
        }
        Console.WriteLine($"exported {manifest.Source} as {format} to {Path.GetFullPath(folder)} ({manifest.Files.Sum(f => f.Bytes)} bytes in {manifest.Files.Count} files)");
        return 0;
    }

    static int ParseId(string s) =>
        int.TryParse(s, out var id) && id >= 0 ? id : throw new ArgumentException($"--prompt-ids: '{s}' is not a token id (a non-negative integer)");
}
