// serve-bench: the model server's engine under closed-loop load (throughput, P50/P99 time to first token and per token)
// at several concurrencies, fp32/int8/int4, held-out perplexity per format, and llama.cpp beside it on a GGUF file.
// Run with -c Release. Results go to stdout as markdown (docs/serving.md keeps the measured ones).
using System.Diagnostics;
using System.Globalization;
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.ServeBench;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

// Every option takes a value: one without (the end, or another option next) is refused, not read as "true" (a file name).
if (args.Select((a, i) => (a, i)).FirstOrDefault(x => x.a.StartsWith("--", StringComparison.Ordinal) && (x.i + 1 >= args.Length || args[x.i + 1].StartsWith("--", StringComparison.Ordinal))).a is { } bare)
{
    Console.Error.WriteLine($"serve-bench: option {bare} needs a value");
    return 2;
}
var options = args.Select((a, i) => (a, i)).Where(x => x.a.StartsWith("--", StringComparison.Ordinal)).ToDictionary(x => x.a[2..], x => args[x.i + 1]);
string Opt(string name, string fallback) => options.TryGetValue(name, out var v) ? v : fallback;
var known = new HashSet<string> { "model", "preset", "formats", "concurrency", "prompt", "output", "requests-per-client", "gguf", "ppl-windows", "ppl-length", "threads", "decode" };
if (options.Keys.FirstOrDefault(k => !known.Contains(k)) is { } unknown)
{
    Console.Error.WriteLine($"serve-bench: unknown option --{unknown}; known: {string.Join(", ", known.Select(k => "--" + k))}");
    return 2;
}
int promptTokens = int.Parse(Opt("prompt", "32"), CultureInfo.InvariantCulture);
int outputTokens = int.Parse(Opt("output", "32"), CultureInfo.InvariantCulture);
int perClient = int.Parse(Opt("requests-per-client", "2"), CultureInfo.InvariantCulture);
var levels = Opt("concurrency", "1,4,16,64").Split(',').Select(s => int.Parse(s, CultureInfo.InvariantCulture)).ToArray();
// --decode absorbed|expanded|both: MLA decode in latent space (the server's default) or the expanded form, or both side by side.
var decodes = Opt("decode", "absorbed") switch
{
    "absorbed" => new[] { true }, "expanded" => [false], "both" => [true, false],
    var d => throw new ArgumentException($"--decode '{d}': expected absorbed, expanded or both"),
};
var formats = Opt("formats", "fp32,bf16,int8,int4").Split(',').Select(f => WeightQuantizer.Parse(f, "--formats")).ToArray();
if (options.TryGetValue("threads", out var threads)) set_num_threads(int.Parse(threads, CultureInfo.InvariantCulture));

// A model folder: --model DIR (a trained export), or the preset random-initialised and saved once.
string folder = Opt("model", "");
if (folder == "")
{
    // With a tokenizer (2048 tokens trained on the shipped corpus), so llama.cpp can load the same model as GGUF.
    folder = Path.Combine(Path.GetTempPath(), $"serve-bench-{Opt("preset", "small")}-bpe2048");
    if (!File.Exists(Path.Combine(folder, HfModelFolder.ConfigFile)))
    {
        var tokenizer = BpeTokenizer.Train(ShippedCorpus.Documents().Take(2000), 2048);
        manual_seed(1);
        using var fresh = new DeepSeekForCausalLM(DeepSeekConfig.Preset(Opt("preset", "small")) with { VocabSize = tokenizer.VocabSize }).InitializeWeights();
        HfModelFolder.Save(folder, fresh, tokenizer);
    }
}
// --gguf FILE: llama.cpp on that file; --gguf f16|q8_0|q4_0: the model folder exported here (GgufExporter) first.
if (options.TryGetValue("gguf", out var ggufOption) && Enum.TryParse<GgufType>(ggufOption, ignoreCase: true, out var ggufType))
{
    var exported = Path.Combine(folder, $"model-{ggufType.ToString().ToLowerInvariant()}.gguf");
    if (!File.Exists(exported)) GgufExporter.Write(folder, exported, ggufType);
    options["gguf"] = exported;
}
Console.WriteLine($"# serve-bench: {folder}, prompt {promptTokens} tokens, {outputTokens} generated per request (greedy, no EOS), " +
                  $"{perClient} requests per client, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}");
Console.WriteLine();
Console.WriteLine("| engine | weights | concurrency | requests | output tok/s | TTFT P50 ms | TTFT P99 ms | TPOT P50 ms | TPOT P99 ms |");
Console.WriteLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
var quality = new List<string>();
var memory = new List<string>();
foreach (var format in formats)
{
    var loaded = HfModelFolder.Load(folder);
    var report = format switch
    {
        WeightFormat.Fp32 => null,
        WeightFormat.Bf16 => WeightQuantizer.ToBf16(loaded.Model),
        _ => WeightQuantizer.Quantize(loaded.Model, format),
    };
    long parameterBytes = loaded.Model.parameters().Sum(p => p.numel() * p.ElementSize);
    if (loaded.Tokenizer is { } tokenizer && int.Parse(Opt("ppl-windows", "16"), CultureInfo.InvariantCulture) is > 0 and var windows)
    {
        var clock = Stopwatch.StartNew();
        double ppl = HeldOutPerplexity.Measure(loaded.Model, tokenizer, windows, int.Parse(Opt("ppl-length", "128"), CultureInfo.InvariantCulture));
        quality.Add($"| {format.ToString().ToLowerInvariant()} | {ppl:F3} | {(report is null ? parameterBytes : parameterBytes - report.Fp32Bytes + report.QuantizedBytes) / 1048576.0:F1} MiB " +
                    $"| {(report is null ? "—" : $"{report.Tensors} matmul weights {report.Fp32Bytes / 1048576.0:F1} → {report.QuantizedBytes / 1048576.0:F1} MiB, max error {report.MaxAbsError:G3}")} | {clock.Elapsed.TotalSeconds:F0} s |");
    }
    loaded.Model.Dispose();
    // Served as the server serves it: decoder layers as integer codes expanded one layer at a time (ServedModel.Load).
    foreach (var absorbed in decodes)
    {
        using var served = ServedModel.Load(format.ToString().ToLowerInvariant(), folder, format,
            new EngineOptions { MaxBatch = levels.Max(), MaxWaiting = levels.Max() * 2, BlockSize = 16, AbsorbedDecode = absorbed }, metrics: null);
        var engine = served.Engine;
        string label = format.ToString().ToLowerInvariant() + (absorbed ? "" : " (expanded MLA)");
        // Tensor bytes, not the working set: the allocator keeps what loading freed, so RSS says little about what is held.
        if (absorbed == decodes[0]) memory.Add($"| {format.ToString().ToLowerInvariant()} | {(served.Quantization is { } q ? $"{q.Fp32Bytes / 1048576.0:F1} → {q.QuantizedBytes / 1048576.0:F1} MiB + {served.ArenaBytes / 1048576.0:F1} MiB one-layer arena" : "all float32")} |");
        await EngineLoad.RunAsync(engine, 1, 1, promptTokens, 4, seed: 99); // warm-up: first-call allocations and kernel selection
        foreach (var c in levels) Print("model-server", label, await EngineLoad.RunAsync(engine, c, perClient, promptTokens, outputTokens, seed: c));
    }
}
if (options.TryGetValue("gguf", out var gguf))
    foreach (var c in levels) Print("llama.cpp", Path.GetFileName(gguf), await LlamaCppLoad.RunAsync(gguf, c, perClient, promptTokens, outputTokens, seed: c));
else
    Console.WriteLine("\n(no --gguf FILE: llama.cpp not run)");
Console.WriteLine("\n| weights | matmul weights held (fp32 → integer codes + scales) |");
Console.WriteLine("| --- | --- |");
memory.ForEach(Console.WriteLine);
if (quality.Count > 0)
{
    Console.WriteLine("\n| weights | held-out perplexity | stored parameters | quantized | time |");
    Console.WriteLine("| --- | --- | --- | --- | --- |");
    quality.ForEach(Console.WriteLine);
}
return 0;

static void Print(string engine, string weights, LoadResult r) => Console.WriteLine(
    $"| {engine} | {weights} | {r.Concurrency} | {r.Requests} | {r.OutputTokensPerSecond:F1} | {r.TtftP50 * 1000:F0} | {r.TtftP99 * 1000:F0} | {r.TpotP50 * 1000:F0} | {r.TpotP99 * 1000:F0} |");
