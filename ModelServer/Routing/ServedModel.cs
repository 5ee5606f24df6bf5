// One loaded model version: its engine, tokenizer and end-of-sequence id. Loading is here; choosing one is RouteTable's.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Metrics;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Templates;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Routing;

public sealed class ServedModel : IDisposable
{
    ServedModel(string version, string folder, WeightFormat format, InferenceEngine engine, BpeTokenizer? tokenizer, int? eos, QuantizationReport? report)
    {
        Version = version; Folder = folder; Format = format; Engine = engine; Tokenizer = tokenizer; EosTokenId = eos; Quantization = report;
    }

    public string Version { get; }
    public string Folder { get; }
    public WeightFormat Format { get; }
    public InferenceEngine Engine { get; }
    public BpeTokenizer? Tokenizer { get; }
    public int? EosTokenId { get; }
    public int? BosTokenId => Tokenizer?.BosTokenId;
    public QuantizationReport? Quantization { get; }
    /// <summary>The folder's chat template (chat_template.jinja or tokenizer_config.json); null: the documented default.</summary>
    public ChatTemplate? ChatTemplate { get; private init; }
    /// <summary>Bytes of the one-layer float32 arena the integer weights are expanded into (0 for fp32).</summary>
    public long ArenaBytes => packed?.ArenaBytes ?? 0;
    public DateTimeOffset LoadedAt { get; } = DateTimeOffset.UtcNow;

    /// <summary>Loads an HF folder (config.json, safetensors, tokenizer.json when present), quantizes it when asked, starts its engine.</summary>
    public static ServedModel Load(string version, string folder, WeightFormat format, EngineOptions options, ServingMetrics? metrics, Device? device = null)
    {
        if (string.IsNullOrWhiteSpace(version) || version.Any(c => char.IsWhiteSpace(c) || c == '@'))
            throw new ArgumentException($"model version '{version}' must be a non-empty name without spaces or '@'");
        // The template first: one it cannot run refuses the model here, naming file, line and column, before weights load.
        ChatTemplate? chatTemplate;
        try { chatTemplate = ChatTemplate.Load(folder); }
        catch (TemplateSyntaxException e) { throw new InvalidDataException(e.Message, e); } // refused like any malformed folder file
        var loaded = HfModelFolder.Load(folder, device);
        QuantizationReport? report = null;
        PackedLayerWeights? packed = null;
        if (format == WeightFormat.Bf16) report = WeightQuantizer.ToBf16(loaded.Model);
        else if (format != WeightFormat.Fp32)
        {
            // Decoder layers: integer codes, one layer expanded at a time; lm_head (outside the layer hook): rounded in place.
            packed = PackedLayerWeights.Pack(loaded.Model, format);
            var head = WeightQuantizer.Quantize(loaded.Model, format, name => !name.StartsWith("model.layers.", StringComparison.Ordinal));
            report = new QuantizationReport(format, head.Tensors + packed.Tensors, head.Fp32Bytes + packed.ReplacedFp32Bytes,
                head.QuantizedBytes + packed.PackedBytes, head.MaxAbsError);
        }
        var engine = new InferenceEngine(loaded.Model, options, version, metrics);
        int? eos = loaded.Tokenizer?.EosTokenId ?? loaded.Model.Config.EosTokenId;
        return new ServedModel(version, folder, format, engine, loaded.Tokenizer, eos, report) { packed = packed, ChatTemplate = chatTemplate };
    }

    // ---- Leases: a request holds its version from routing to its last byte ----

    int leases;
    bool retired;
    readonly TaskCompletionSource idle = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Holds the version for one request; false once it is retired (the caller resolves again).</summary>
    public bool TryAcquire()
    {
        lock (idle)
        {
            if (retired) return false;
            leases++;
            return true;
        }
    }

    public void Release()
    {
        lock (idle)
            if (--leases == 0 && retired) idle.TrySetResult();
    }

    /// <summary>Takes no new leases and completes when the last request holding one has finished.</summary>
    public Task RetireAsync()
    {
        lock (idle)
        {
            retired = true;
            if (leases == 0) idle.TrySetResult();
        }
        return idle.Task;
    }

    PackedLayerWeights? packed;

    public void Dispose()
    {
        Engine.Dispose();
        packed?.Dispose();
    }
}
