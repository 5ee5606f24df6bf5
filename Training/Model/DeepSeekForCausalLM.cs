// The DeepSeek-V3 causal language model (HF DeepseekV3ForCausalLM) with MTP modules, HF weight names and the MLA cache.
using System.Text.RegularExpressions;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: B batch, T tokens, D hidden, V vocabulary.
public sealed record CausalLmOutput(Tensor Logits_BTV, Tensor Hidden_BTD, IReadOnlyList<Tensor> MtpLogits, Tensor? AuxLoss);

/// <summary>HF's DeepseekV3Model: embeddings, decoder layers, final norm.</summary>
public sealed class DeepSeekModel : nn.Module<Tensor, Tensor>
{
    public Embedding embed_tokens;
    public ModuleList<DecoderLayer> layers;
    public RmsNorm norm;

    public DeepSeekModel(DeepSeekConfig config, RotaryEmbedding rotary) : base(nameof(DeepSeekModel))
    {
        embed_tokens = nn.Embedding(config.VocabSize, config.HiddenSize);
        layers = new ModuleList<DecoderLayer>();
        for (int i = 0; i < config.NumHiddenLayers; i++)
            layers.Add(new DecoderLayer(config, rotary, moe: i >= config.FirstKDenseReplace));
        norm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        RegisterComponents();
    }

    public override Tensor forward(Tensor ids_BT) => Forward(ids_BT, null).hidden;

    /// <summary>Called with a decoder layer's index just before it runs (the model server materialises that layer's quantized weights there).</summary>
    public Action<int>? BeforeLayer { get; set; }

    /// <summary>
    /// Told when the backward of everything after the decoder layers is done (the final norm, the head, the MTP modules;
    /// not the embedding, used first too): a <see cref="BackwardSignal"/> on the final norm's input. Null: no signal.
    /// </summary>
    public IBackwardListener? HeadBackwardDone { get; set; }

    /// <summary>Final-normed hidden states (B, T, D) and the summed balance loss of the MoE layers.</summary>
    public (Tensor hidden, Tensor? auxLoss) Forward(Tensor ids_BT, ILatentCache? cache)
    {
        using var scope = NewDisposeScope();
        long start = 0; // without a cache the tokens start at 0; with one, the cache places them (ILatentCache.Rotation)
        var h = embed_tokens.forward(ids_BT);
        Tensor? aux = null;
        for (int i = 0; i < layers.Count; i++)
        {
            BeforeLayer?.Invoke(i);
            var (next, layerAux) = layers[i].Forward(h, start, cache, i);
            h = next;
            if (layerAux is not null) aux = aux is null ? layerAux : aux + layerAux;
        }
        if (HeadBackwardDone is { } done && training && is_grad_enabled() && h.requires_grad) h = BackwardSignal.Around(h, done);
        return (norm.forward(h).MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope());
    }
}

public sealed class DeepSeekForCausalLM : nn.Module<Tensor, Tensor>
{
    public DeepSeekModel model;
    public Linear lm_head;
    public ModuleList<MultiTokenPrediction> mtp;

    public DeepSeekConfig Config { get; }
    public RotaryEmbedding Rotary { get; }

    public DeepSeekForCausalLM(DeepSeekConfig config) : base(nameof(DeepSeekForCausalLM))
    {
        Config = config.Validated();
        Rotary = new RotaryEmbedding(config);
        model = new DeepSeekModel(config, Rotary);
        lm_head = nn.Linear(config.HiddenSize, config.VocabSize, hasBias: false);
        mtp = new ModuleList<MultiTokenPrediction>();
        for (int k = 0; k < config.NumNextnPredictLayers; k++) mtp.Add(new MultiTokenPrediction(config, Rotary));
        RegisterComponents();
        if (config.TieWordEmbeddings) lm_head.weight = model.embed_tokens.weight!;
    }

    static readonly object SeedLock = new();

    /// <summary>
    /// The model of <paramref name="seed"/>: torch's global generator seeded, the modules built and initialized as HF does,
    /// all under one process-wide lock — the generator is shared by every thread of the process, and models built at once
    /// (in-process workers, tests running side by side) would interleave their draws and start from different weights.
    /// </summary>
    public static DeepSeekForCausalLM FromSeed(DeepSeekConfig config, long seed)
    {
        lock (SeedLock)
        {
            manual_seed(seed);
            return new DeepSeekForCausalLM(config).InitializeWeights();
        }
    }

    /// <summary>Initializes weights as HF does (normal(0, initializer_range), norms to one, biases to zero), from the global torch seed.</summary>
    public DeepSeekForCausalLM InitializeWeights()
    {
        using var noGrad = no_grad();
        double std = Config.InitializerRange;
        foreach (var (name, p) in named_parameters())
        {
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) p.fill_(1.0);
            else if (name.EndsWith(".bias", StringComparison.Ordinal)) p.zero_();
            else nn.init.normal_(p, 0, std);
        }
        foreach (var (name, b) in named_buffers())
            if (name.EndsWith("e_score_correction_bias", StringComparison.Ordinal)) b.zero_();
        return this;
    }

    public override Tensor forward(Tensor ids_BT) => Forward(ids_BT).Logits_BTV;

    /// <summary>
    /// Logits for every position; with <paramref name="withMtp"/>, MTP depth k gives logits (B, T-k, V) where
    /// position i predicts token i+k+1. The cache, when given, is extended by these tokens.
    /// </summary>
    public CausalLmOutput Forward(Tensor ids_BT, ILatentCache? cache = null, bool withMtp = false)
    {
        using var scope = NewDisposeScope();
        var (hidden, aux) = model.Forward(ids_BT, cache);
        var logits = lm_head.forward(hidden);
        var mtpLogits = new List<Tensor>();
        if (withMtp)
        {
            long T = ids_BT.shape[1];
            var previous = hidden;
            for (int k = 1; k <= mtp.Count && k < T; k++)
            {
                var ahead = model.embed_tokens.forward(ids_BT.narrow(1, k, T - k));
                var (h, mtpAux) = mtp[k - 1].Forward(previous.narrow(1, 0, T - k), ahead);
                if (mtpAux is not null) aux = aux is null ? mtpAux : aux + mtpAux;
                mtpLogits.Add(lm_head.forward(mtp[k - 1].shared_head.forward(h)).MoveToOuterDisposeScope());
                previous = h;
            }
        }
        return new CausalLmOutput(logits.MoveToOuterDisposeScope(), hidden.MoveToOuterDisposeScope(), mtpLogits, aux?.MoveToOuterDisposeScope());
    }

    public IEnumerable<DeepSeekMoe> MoeLayers()
    {
        foreach (var layer in model.layers) if (layer.Moe is { } m) yield return m;
        foreach (var m in mtp) if (m.block.Moe is { } mm) yield return mm;
    }

    public LatentKvCache NewCache() => new(Config.NumHiddenLayers);

    // ---- Hugging Face names ----

    static readonly Regex MtpName = new(@"^mtp\.(\d+)\.(block\.)?(.*)$", RegexOptions.Compiled);
    static readonly Regex HfMtpName = new(@"^model\.layers\.(\d+)\.(.*)$", RegexOptions.Compiled);

    /// <summary>Maps an internal parameter name to its HF checkpoint name (MTP modules become model.layers.{L+k}).</summary>
    public string ToHfName(string name)
    {
        var m = MtpName.Match(name);
        if (!m.Success) return name;
        int layer = Config.NumHiddenLayers + int.Parse(m.Groups[1].Value);
        return $"model.layers.{layer}.{m.Groups[3].Value}";
    }

    /// <summary>Maps an HF checkpoint name to an internal name; null for the MTP copies of the shared embedding and head.</summary>
    public string? FromHfName(string hfName)
    {
        var m = HfMtpName.Match(hfName);
        if (!m.Success) return hfName;
        int layer = int.Parse(m.Groups[1].Value);
        if (layer < Config.NumHiddenLayers) return hfName;
        int k = layer - Config.NumHiddenLayers;
        var rest = m.Groups[2].Value;
        if (rest is "embed_tokens.weight" or "shared_head.head.weight") return null;
        bool own = rest.StartsWith("enorm.", StringComparison.Ordinal) || rest.StartsWith("hnorm.", StringComparison.Ordinal)
                   || rest.StartsWith("eh_proj.", StringComparison.Ordinal) || rest.StartsWith("shared_head.", StringComparison.Ordinal);
        return own ? $"mtp.{k}.{rest}" : $"mtp.{k}.block.{rest}";
    }

    /// <summary>
    /// Parameters and persistent buffers under HF names, in a stable order. MTP modules also get copies of the
    /// embedding and output head under their own prefix, as DeepSeek-V3's released checkpoint stores them.
    /// </summary>
    public List<KeyValuePair<string, Tensor>> HfStateDict()
    {
        var result = new List<KeyValuePair<string, Tensor>>();
        var seen = new HashSet<IntPtr>();
        foreach (var (name, t) in state_dict())
        {
            if (Config.TieWordEmbeddings && name == "lm_head.weight") continue;
            if (!seen.Add(t.Handle) && name == "lm_head.weight") continue;
            result.Add(new(ToHfName(name), t));
        }
        for (int k = 0; k < mtp.Count; k++)
        {
            int layer = Config.NumHiddenLayers + k;
            result.Add(new($"model.layers.{layer}.embed_tokens.weight", model.embed_tokens.weight!));
            result.Add(new($"model.layers.{layer}.shared_head.head.weight", lm_head.weight!));
        }
        return result;
    }

    /// <summary>Copies weights given under HF names into this model. Every model tensor must be present with its exact shape.</summary>
    public void LoadHfStateDict(IReadOnlyDictionary<string, Tensor> hf, string source)
    {
        var own = state_dict();
        var assigned = new HashSet<string>();
        var unexpected = new List<string>();
        using var noGrad = no_grad();
        foreach (var (hfName, value) in hf)
        {
            var name = FromHfName(hfName);
            if (name is null) continue;
            if (!own.TryGetValue(name, out var target))
            {
                // HF-written folders of models with MTP usually omit it; extra MTP layers beyond ours are ignored.
                if (HfMtpName.Match(hfName) is { Success: true } m && int.Parse(m.Groups[1].Value) >= Config.NumHiddenLayers + mtp.Count) continue;
                unexpected.Add(hfName);
                continue;
            }
            if (!target.shape.SequenceEqual(value.shape))
                throw new InvalidDataException($"{source}: tensor '{hfName}' has shape [{string.Join(", ", value.shape)}], the model expects [{string.Join(", ", target.shape)}]");
            target.copy_(value);
            assigned.Add(name);
        }
        if (unexpected.Count > 0)
            throw new InvalidDataException($"{source}: tensors the model does not have: {string.Join(", ", unexpected.Take(10))}{(unexpected.Count > 10 ? $" and {unexpected.Count - 10} more" : "")}");
        var missing = own.Keys.Where(n => !assigned.Contains(n) && !(Config.TieWordEmbeddings && n == "lm_head.weight")).ToList();
        // MTP weights may be absent (HF transformers drops them on save): keep their initialization, but nothing else.
        var missingMain = missing.Where(n => !n.StartsWith("mtp.", StringComparison.Ordinal)).ToList();
        if (missingMain.Count > 0)
            throw new InvalidDataException($"{source}: missing tensors: {string.Join(", ", missingMain.Take(10).Select(ToHfName))}{(missingMain.Count > 10 ? $" and {missingMain.Count - 10} more" : "")}");
        MissingMtpOnLoad = missing.Count > 0;
    }

    /// <summary>True when the last load had no MTP weights (the MTP modules keep their initial values).</summary>
    public bool MissingMtpOnLoad { get; private set; }
}
