// One pipeline stage of a DeepSeekForCausalLM: which parameters it owns and its part of the forward pass.
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Pipeline;

// Shape legend: B batch, T tokens, D hidden, V vocabulary.

/// <summary>The forward outputs of one micro-batch on one stage; the last stage adds the loss terms.</summary>
public sealed record StageOutput(Tensor Hidden_BTD, Tensor? Embeddings_BTD, Tensor? AuxLoss, Tensor? LmLoss, Tensor? MtpLoss);

/// <summary>
/// Stage s of <see cref="Layout"/> owns decoder layers <see cref="Layers"/>; stage 0 also the embedding, the last stage
/// the final norm, the output head and the MTP modules — the same split as <see cref="ShardingPlan.StageOf"/>, so a
/// stage's checkpoint shard is exactly what it trains. The stage keeps the whole module tree (so that names,
/// initialization from the global seed and the HF mapping are those of the single-process model) but releases the
/// storage of every parameter it does not own (the whole model is built once per stage for that, then shrinks).
/// <para>
/// MTP depth k needs the embeddings of tokens i+k, which live on stage 0. Instead of a second, tied copy of the
/// embedding on the last stage (Megatron's approach, which needs an extra all-reduce of a V×D gradient every step and
/// keeping two copies equal), stage 0 sends the embedding output (B, T, D) down the pipeline beside the hidden states
/// and receives its gradient back; MTP narrows it. See docs/decisions.md.
/// </para>
/// </summary>
public sealed class PipelineStage
{
    public DeepSeekForCausalLM Model { get; }
    public ParallelLayout Layout { get; }
    public int Index { get; }
    public StageLayers Layers => Layout.Stages[Index];
    public bool IsFirst => Index == 0;
    public bool IsLast => Index == Layout.Pp - 1;
    /// <summary>The owned parameters under HF names, in the model's parameter order.</summary>
    public IReadOnlyList<(string Name, Tensor Param)> Parameters { get; }
    /// <summary>
    /// Every tensor of a whole-model training checkpoint (weights, routing biases, AdamW moments) with its full shape:
    /// the catalog every rank's <see cref="ShardingPlan"/> needs, recorded before the other stages' storage is released.
    /// </summary>
    public IReadOnlyList<TensorEntry> CheckpointCatalog { get; }

    readonly ShardingPlan ownership;

    public PipelineStage(DeepSeekForCausalLM model, ParallelLayout layout, int stage)
    {
        layout.Validated();
        if (stage < 0 || stage >= layout.Pp) throw new ArgumentOutOfRangeException(nameof(stage), stage, $"stage must be in [0, {layout.Pp})");
        if (layout.NumLayers != model.Config.NumHiddenLayers)
            throw new ArgumentException($"the layout splits {layout.NumLayers} layers; the model has {model.Config.NumHiddenLayers}");
        if (layout.Pp > 1 && model.Config.TieWordEmbeddings)
            throw new ArgumentException("pipeline stages need untied embeddings: with tie_word_embeddings the head's weight is the embedding of stage 0");
        Model = model;
        Layout = layout;
        Index = stage;
        ownership = new ShardingPlan(layout, []);
        Parameters = model.named_parameters().Select(p => (Name: model.ToHfName(p.name), Param: (Tensor)p.parameter))
            .Where(p => ownership.StageOf(p.Name) == stage).ToList();
        // A throwaway AdamW over the whole model names and shapes its state exactly as the trainers' optimizers do.
        using (var whole = new AdamW(model.named_parameters().Select(p => (model.ToHfName(p.name), (Tensor)p.parameter))))
            CheckpointCatalog = CheckpointTensors.Catalog(model, whole); // an expert shard's still names every expert
        if (layout.Pp > 1) ReleaseOthers(ownership);
    }

    /// <summary>This stage's checkpoint tensors (aliases): its weights and routing biases and <paramref name="optimizer"/>'s state.</summary>
    public Dictionary<string, Tensor> StageTensors(AdamW optimizer) =>
        CheckpointTensors.Collect(Model, optimizer).Where(kv => ownership.StageOf(kv.Key) == Index)
            .ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);

    /// <summary>
    /// Loads this stage's tensors of committed step <paramref name="step"/> (saved with any layout: only the tensors this
    /// stage owns are read, whole) into the model and <paramref name="optimizer"/>, and sets its step count. The config
    /// and the stage's catalogue are checked first: a checkpoint of another model, or one without a tensor the stage
    /// needs, is refused before any tensor is touched.
    /// </summary>
    public async Task<CheckpointManifest> LoadCheckpointAsync(ICheckpointSource source, long step, AdamW optimizer, string? tokenizerSha256 = null,
                                                             CancellationToken ct = default)
    {
        var manifest = await source.ReadManifestAsync(step, ct);
        string label = $"step {step} of job '{manifest.Job}'";
        if (tokenizerSha256 is not null && manifest.TokenizerSha256 is { } saved && saved != tokenizerSha256)
            throw new InvalidDataException($"{label} was saved with tokenizer {saved}, this run's is {tokenizerSha256}");
        if (manifest.Config is { } config)
        {
            var differing = CheckpointCompatibility.Differences(DeepSeekConfig.FromJson(config.GetRawText(), $"the config.json of {label}"), Model.Config);
            if (differing.Count > 0)
                throw new InvalidDataException($"{label} is for a different model: it is for {string.Join(", ", differing.Select(d => $"{d.Name} {d.Saved}"))}; " +
                    $"this model has {string.Join(", ", differing.Select(d => $"{d.Name} {d.Ours}"))}. Nothing was loaded.");
        }
        var live = StageTensors(optimizer);
        // Master weights (mixed precision) that the checkpoint lacks are rebuilt from the loaded parameters below.
        var missing = live.Where(kv => !manifest.Tensors.ContainsKey(kv.Key) && !kv.Key.EndsWith(".master", StringComparison.Ordinal))
            .Select(kv => kv.Key).ToList();
        // A ZeRO replica holds its rows of the stage's optimizer state: the whole shape is the catalogue's.
        var whole = CheckpointCatalog.ToDictionary(e => e.Name, e => e.Shape, StringComparer.Ordinal);
        var misshapen = live.Where(kv => manifest.Tensors.TryGetValue(kv.Key, out var t) && !t.Shape.SequenceEqual(whole.GetValueOrDefault(kv.Key, kv.Value.shape)))
            .Select(kv => $"{kv.Key} ({string.Join("x", manifest.Tensors[kv.Key].Shape)} stored, {string.Join("x", whole.GetValueOrDefault(kv.Key, kv.Value.shape))} here)").ToList();
        if (missing.Count > 0 || misshapen.Count > 0)
            throw new InvalidDataException($"{label} does not fit stage {Index}: " +
                string.Join("; ", new[] { missing.Count > 0 ? $"missing {string.Join(", ", missing.Take(5))}{(missing.Count > 5 ? $" and {missing.Count - 5} more" : "")}" : null,
                                          misshapen.Count > 0 ? $"other shapes: {string.Join(", ", misshapen.Take(5))}" : null }.Where(x => x is not null)) + ". Nothing was loaded.");

        var shardRows = optimizer.ShardRows(); // a ZeRO replica reads only its rows of the optimizer state, whatever layout saved it
        var needs = live.Keys.Where(manifest.Tensors.ContainsKey)
            .Select(name => shardRows.TryGetValue(name, out var rows) ? new TensorSlice(name, rows.Start, rows.Count) : new TensorSlice(name, 0, manifest.Tensors[name].Rows));
        var loaded = await ShardedCheckpointLoader.LoadAsync(source, manifest, needs, ct);
        try
        {
            using var noGrad = no_grad();
            foreach (var (name, t) in loaded) live[name].copy_(t);
            foreach (var s in optimizer.Slots)
                if (s.Master is not null && !loaded.ContainsKey($"optimizer.{s.Name}.master"))
                {
                    using var own = s.Own(s.Param);
                    s.Master.copy_(own.to_type(ScalarType.Float32));
                }
        }
        finally { foreach (var t in loaded.Values) t.Dispose(); }
        optimizer.StepCount = manifest.OptimizerSteps;
        return manifest;
    }

    /// <summary>Frees the storage of the parameters another stage owns (never read here); the routing-bias buffers are small and stay.</summary>
    void ReleaseOthers(ShardingPlan plan)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in Model.named_parameters())
            if (plan.StageOf(Model.ToHfName(name)) != Index) p.set_(empty(0, dtype: p.dtype, device: p.device));
    }

    /// <summary>The MoE layers of this stage in the model's order (its decoder layers, then the MTP modules on the last stage).</summary>
    public IEnumerable<DeepSeekMoe> MoeLayers()
    {
        for (int i = Layers.FirstLayer; i < Layers.End; i++)
            if (Model.model.layers[i].Moe is { } m) yield return m;
        if (IsLast)
            foreach (var m in Model.mtp)
                if (m.block.Moe is { } mm) yield return mm;
    }

    /// <summary>
    /// The first stage embeds <paramref name="ids_BT"/>; later stages continue from <paramref name="input_BTD"/>. Every
    /// stage runs its decoder layers; the last one also the head, the MTP modules (with <paramref name="embeddings_BTD"/>
    /// from stage 0, or its own on a single stage) and the losses against <paramref name="batch_BT1"/> (the micro-batch
    /// with its next token, T + 1 columns).
    /// </summary>
    public StageOutput Forward(Tensor? ids_BT, Tensor? input_BTD, Tensor? embeddings_BTD, Tensor? batch_BT1, bool withMtp)
    {
        Tensor h;
        if (IsFirst)
        {
            h = Model.model.embed_tokens.forward(ids_BT ?? throw new ArgumentNullException(nameof(ids_BT), "the first stage embeds the token ids"));
            if (withMtp) embeddings_BTD = h;
        }
        else h = input_BTD ?? throw new ArgumentNullException(nameof(input_BTD), $"stage {Index} needs the hidden states of stage {Index - 1}");
        Tensor? aux = null;
        for (int i = Layers.FirstLayer; i < Layers.End; i++)
        {
            var (next, layerAux) = Model.model.layers[i].Forward(h, 0, null, i);
            h = next;
            if (layerAux is not null) aux = aux is null ? layerAux : aux + layerAux;
        }
        if (!IsLast) return new StageOutput(h, embeddings_BTD, aux, null, null);

        var target = batch_BT1 ?? throw new ArgumentNullException(nameof(batch_BT1), "the last stage needs the micro-batch for its targets");
        long T = target.shape[1] - 1;
        var hidden = Model.model.norm.forward(h);
        var lm = CrossEntropy(Model.lm_head.forward(hidden), target.narrow(1, 1, T));
        Tensor? mtp = null;
        if (withMtp && Model.mtp.Count > 0)
        {
            // Depth k at position i predicts token i+k+1 from the embedding of token i+k (as DeepSeekForCausalLM.Forward).
            var emb = embeddings_BTD ?? throw new ArgumentNullException(nameof(embeddings_BTD), "MTP needs the embeddings of stage 0");
            var previous = hidden;
            int depths = 0;
            for (int k = 1; k <= Model.mtp.Count && k < T; k++)
            {
                var (hk, mtpAux) = Model.mtp[k - 1].Forward(previous.narrow(1, 0, T - k), emb.narrow(1, k, T - k));
                if (mtpAux is not null) aux = aux is null ? mtpAux : aux + mtpAux;
                var logits = Model.lm_head.forward(Model.mtp[k - 1].shared_head.forward(hk));
                var ce = CrossEntropy(logits, target.narrow(1, k + 1, logits.shape[1]));
                mtp = mtp is null ? ce : mtp + ce;
                previous = hk;
                depths++;
            }
            if (mtp is not null) mtp = mtp / depths;
        }
        return new StageOutput(h, embeddings_BTD, aux, lm, mtp);
    }

    static Tensor CrossEntropy(Tensor logits_BTV, Tensor target_BT)
    {
        long v = logits_BTV.shape[^1];
        var logits = logits_BTV.dtype == ScalarType.Float64 ? logits_BTV : logits_BTV.to_type(ScalarType.Float32);
        return nn.functional.cross_entropy(logits.reshape(-1, v), target_BT.reshape(-1));
    }
}
