// Export benchmark: time and size of each export format for a preset, and the perplexity of the GGUF files in llama.cpp against our fp32 model.
using System.Diagnostics;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Export;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class ExportBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("export", args);
        string preset = o.String("--preset", "small");
        string? modelDir = o.Optional("--model");
        int vocab = o.Int("--vocab", 2048, 2);
        int tokens = o.Int("--tokens", 1024, 1), window = o.Int("--window", 256, 1);
        o.Done();
        string dir = Path.Combine(Path.GetTempPath(), $"deepseek-export-bench-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            Console.WriteLine($"# DeepSeekCluster export benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
            Console.WriteLine($"machine: {Environment.ProcessorCount} cores, load average {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
            var docs = ShippedCorpus.Documents().ToList();
            var (train, heldOut) = ShippedCorpus.Split(docs, validationFraction: 0.05, seed: 1);
            DeepSeekForCausalLM model;
            BpeTokenizer tokenizer;
            if (modelDir is not null)
            {
                var loaded = HfModelFolder.Load(modelDir);
                (model, tokenizer) = (loaded.Model, loaded.Tokenizer ?? throw new ArgumentException($"--model {modelDir} has no tokenizer.json"));
                Console.WriteLine($"model: {modelDir}");
            }
            else
            {
                tokenizer = BpeTokenizer.Train(train.Take(2000), vocab);
                manual_seed(1);
                model = new DeepSeekForCausalLM(DeepSeekConfig.Preset(preset) with { VocabSize = tokenizer.VocabSize }).InitializeWeights();
                Console.WriteLine($"model: preset {preset}, randomly initialized (no --model given), vocab {tokenizer.VocabSize}");
            }
            using var _ = model;
            model.eval();
            Console.WriteLine($"{model.Config.ParameterCount() / 1e6:F1} M parameters (+{model.Config.MtpParameterCount() / 1e6:F1} M MTP, dropped by GGUF)");
            Console.WriteLine();

            Console.WriteLine("| format | export s | size MB |");
            Console.WriteLine("|---|---:|---:|");
            var files = new Dictionary<string, string>();
            foreach (var format in ModelExport.Formats)
            {
                var folder = Path.Combine(dir, format);
                var clock = Stopwatch.StartNew();
                var manifest = ModelExport.Write(model, tokenizer, format, folder, "bench", 0, "bench");
                Console.WriteLine($"| {format} | {clock.Elapsed.TotalSeconds:F2} | {manifest.Files.Sum(f => f.Bytes) / 1e6:F1} |");
                files[format] = folder;
            }
            Console.WriteLine();

            var ids = tokenizer.Encode(string.Join("\n", heldOut)).Take(tokens).ToArray();
            Console.WriteLine($"perplexity over {ids.Length} held-out tokens in windows of {window} (each window from an empty cache):");
            Console.WriteLine();
            Console.WriteLine("| runtime | perplexity | vs fp32 |");
            Console.WriteLine("|---|---:|---:|");
            double ours = Perplexity(ids, window, w => OurLogits(model, w));
            Console.WriteLine($"| ours, fp32 (TorchSharp) | {ours:F3} | |");
            foreach (var format in new[] { "gguf-f16", "gguf-q8_0", "gguf-q4_0" })
            {
                using var llama = new LlamaCpp(Path.Combine(files[format], "model.gguf"), (uint)window);
                double theirs = Perplexity(ids, window, llama.Logits);
                Console.WriteLine($"| llama.cpp {format} | {theirs:F3} | {(theirs / ours - 1) * 100:+0.00;-0.00}% |");
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    static float[][] OurLogits(DeepSeekForCausalLM model, IReadOnlyList<int> tokens)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var logits = model.Forward(tensor(tokens.Select(t => (long)t).ToArray()).unsqueeze(0)).Logits_BTV[0].contiguous();
        int V = (int)logits.shape[1];
        var flat = logits.data<float>().ToArray();
        return Enumerable.Range(0, tokens.Count).Select(t => flat.AsSpan(t * V, V).ToArray()).ToArray();
    }

    /// <summary>exp of the mean next-token negative log-likelihood over consecutive windows, in float64.</summary>
    static double Perplexity(int[] ids, int window, Func<IReadOnlyList<int>, float[][]> logitsOf)
    {
        double nll = 0;
        long count = 0;
        for (int start = 0; start + 1 < ids.Length; start += window)
        {
            var w = ids.Skip(start).Take(window).ToArray();
            var logits = logitsOf(w);
            for (int t = 0; t + 1 < w.Length; t++, count++)
            {
                double max = logits[t].Max();
                nll -= logits[t][w[t + 1]] - max - Math.Log(logits[t].Sum(l => Math.Exp(l - max)));
            }
        }
        return Math.Exp(nll / count);
    }
}
