// Predicted bytes per rank of a layout (parameters, gradients, optimizer, activations), and the refusal of a plan that does not fit.
using DeepSeekCluster.Training.Model;
using DeviceType = TorchSharp.DeviceType;
using ScalarType = TorchSharp.torch.ScalarType;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>What besides the layout decides a rank's memory.</summary>
/// <param name="Precision">fp32, bf16 (bf16 weights, gradients and activations; fp32 master weights and moments) or fp64 (tests).</param>
/// <param name="Recompute">none, full (only each layer's input is kept) or selective (norms, SwiGLU products and MLA up-projections recomputed).</param>
/// <param name="MicroBatchesPerStep">Micro-batches one replica runs per step: what a gpipe stage holds at once.</param>
/// <param name="Redundancy">parallel.redundancy: a rank also holds the state of its ring neighbour that no other replica holds
/// (<see cref="MemoryPlanner.NeighbourElements"/>): a ZeRO rank its optimizer shard (2/dp, not 1/dp), and without fp32 master
/// rows (fp32, fp64) the parameter rows of it that are held once (ZeRO-3's; under ep the experts'), counted in Parameters.</param>
/// <param name="Zero3Overlap">TrainingOptions.Zero3Overlap (ZeRO-3 without ep): gradients reduce-scattered per layer, the next layer's gather prefetched.</param>
/// <param name="Device">Where the rank computes: with the precision and the length it decides which attention form the
/// layers run (<see cref="CausalAttention.PrefersWrittenOut(DeviceType, ScalarType, long)"/>), and so what attention keeps.</param>
public sealed record MemoryInputs(string Precision, string Recompute, int MicroBatch, int SeqLen, int MicroBatchesPerStep = 1, string PipelineSchedule = "1f1b",
                                  bool Redundancy = false, bool Zero3Overlap = true, DeviceType Device = DeviceType.CPU);

/// <summary>One rank's predicted resident bytes, by kind.</summary>
/// <param name="Parameters">What the rank holds between steps (under ZeRO-3 its rows alone).</param>
/// <param name="GradientWords">The part of <paramref name="Gradients"/> that is the exact sum's int64 words (16 bytes per summed element).</param>
/// <param name="Gathered">ZeRO-3: parameters held whole during a step besides the rank's rows (everything outside the
/// decoder layers, and the largest layer while it runs, or with the overlap the largest two consecutive ones: one runs
/// while the next is prefetched); 0 otherwise.</param>
public sealed record RankMemory(int Rank, long Parameters, long Gradients, long GradientWords, long Optimizer, long Activations, long Gathered = 0)
{
    public long Total => Parameters + Gathered + Gradients + Optimizer + Activations;

    public override string ToString() =>
        $"rank {Rank}: parameters {Gib(Parameters)}{(Gathered > 0 ? $" (+ {Gib(Gathered)} gathered)" : "")} + gradients {Gib(Gradients)} + optimizer {Gib(Optimizer)} + activations {Gib(Activations)} = {Gib(Total)}";

    /// <summary>Bytes in GiB or MiB, and below 0.1 MiB as bytes: a budget of a few bytes must not read as "0 MiB".</summary>
    public static string Gib(long bytes) => bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):0.##} GiB"
        : bytes >= (1L << 20) / 10 ? $"{bytes / (double)(1L << 20):0.#} MiB" : $"{bytes:N0} bytes";
}

/// <summary>A plan whose predicted bytes on some rank exceed the worker's memory: refused before anything is allocated.</summary>
public sealed class PlanDoesNotFitException(string message) : InvalidOperationException(message);

/// <summary>
/// Predicts the bytes each rank of a layout holds while training, from the model's shape alone (nothing is built):
/// <list type="bullet">
/// <item>parameters: its stage's, with its 1/ep of the routed experts, and 1/dp of them under ZeRO-3, which also holds
/// everything outside the decoder layers and one layer whole during a step (<see cref="RankMemory.Gathered"/>; ZeRO-3
/// recomputes every layer, so its activations are those of full recompute whatever the option says);</item>
/// <item>gradients: one <c>.grad</c> per parameter in the parameters' dtype (under ZeRO-3 with the overlap only those
/// outside the layers and the largest layer's: each layer's are reduce-scattered and freed when its backward ends), and
/// the exact sum's two int64 words per element (ExactGradientSum), 1/dp of the words under ZeRO-2 and up, plus its
/// float64 conversion scratch;</item>
/// <item>optimizer: both AdamW moments (and the fp32 master in bf16), 1/dp of them under ZeRO-1 and up (under ep: 1/dp of
/// the replicated ones and 1/(dp/ep) of the held experts, which only their dp/ep holders split);</item>
/// <item>activations: what autograd keeps per micro-batch (each layer's norms, attention, MLP or MoE as the recompute mode
/// leaves them, the head), times the micro-batches a pipeline stage holds at once, plus the heads' cross-entropy gradients
/// at the start of the backward (last stage); full recompute keeps only each layer's input, and its peak is in the
/// backward: the heads' cross-entropy gradients, or one layer's whole set beside the input gradients the rerun segments
/// return (<see cref="FullRecomputeBackwardBytes"/>).</item>
/// </list>
/// The first three are counts of tensors the trainer allocates (checked against measured tensors within 10%); the
/// activations count the tensors the code saves for the backward (one layer checked against its measured bytes within
/// 10% per mode) and the backward's largest transients (the heads' cross-entropy gradients; under full recompute the
/// rerun layer's set and the input gradients the segments return), not every temporary of every op: an estimate, stated as
/// such where they are shown, whose whole-model peak is checked within 10% per mode.
/// </summary>
public static class MemoryPlanner
{
    const long ExactWordBytes = 16, ExactScratchElements = 1L << 22;

    public static (int Param, int Moment, int Master, int Activation) ElementBytes(string precision) => precision switch
    {
        "fp32" => (4, 4, 0, 4),
        "bf16" => (2, 4, 4, 2),
        "fp64" => (8, 8, 0, 8),
        _ => throw new ArgumentException($"precision '{precision}': expected fp32, bf16 or fp64", nameof(precision)),
    };

    /// <summary>The dtype the layers compute in at <paramref name="precision"/>.</summary>
    public static ScalarType ComputeType(string precision) => precision switch
    {
        "fp32" => ScalarType.Float32,
        "bf16" => ScalarType.BFloat16,
        "fp64" => ScalarType.Float64,
        _ => throw new ArgumentException($"precision '{precision}': expected fp32, bf16 or fp64", nameof(precision)),
    };

    /// <summary>The parameters rank <paramref name="rank"/> holds whole (before ZeRO-3): its stage's, its share of the routed experts.</summary>
    public static long LocalParameters(DeepSeekConfig config, ParallelLayout layout, int rank)
    {
        var (replicated, experts) = LocalParts(config, layout, rank);
        return replicated + experts;
    }

    /// <summary>The parameters rank <paramref name="rank"/> holds whole, split into replicated ones and its share of the routed experts.</summary>
    public static (long Replicated, long Experts) LocalParts(DeepSeekConfig config, ParallelLayout layout, int rank)
    {
        int stage = layout.StageOfRank(rank);
        var layers = layout.Stages[stage];
        long total = 0, routed = 0;
        for (int l = layers.FirstLayer; l < layers.End; l++)
        {
            total += config.LayerParameterCount(l);
            routed += config.RoutedExpertParameterCount(l);
        }
        long vocabRows = (long)config.VocabSize * config.HiddenSize;
        if (stage == 0) total += vocabRows;
        if (stage == layout.Pp - 1)
        {
            total += config.HiddenSize + (config.TieWordEmbeddings ? 0 : vocabRows) + config.MtpParameterCount();
            for (int m = 0; m < config.NumNextnPredictLayers; m++) routed += config.RoutedExpertParameterCount(config.NumHiddenLayers + m);
        }
        return (total - routed, routed / layout.Ep);
    }

    /// <summary>
    /// The elements of rank <paramref name="rank"/>'s ZeRO shard: 1/Dp of its parameters, or, under ep, 1/Dp of the
    /// replicated ones and 1/(Dp/Ep) of its experts (only the Dp/Ep replicas holding them split them: ExpertZeroStep).
    /// </summary>
    public static long ShardParameters(DeepSeekConfig config, ParallelLayout layout, int rank)
    {
        var (replicated, experts) = LocalParts(config, layout, rank);
        if (layout.Ep == 1) return (replicated + experts + layout.Dp - 1) / layout.Dp;
        int holders = layout.Dp / layout.Ep;
        return (replicated + layout.Dp - 1) / layout.Dp + (experts + holders - 1) / holders;
    }

    /// <summary>
    /// parallel.redundancy: the parameters whose state rank <paramref name="rank"/> copies from its ring neighbour, the pieces
    /// of it no other replica holds: its ZeRO shard (under ep its replicated rows / dp and its experts' / (dp/ep)), or at
    /// zero 0 its experts where dp = ep (each held once); <c>Rows</c>: those whose parameter rows the copy holds too when
    /// there is no fp32 master (ZeRO-3's; under ep the experts', from which a lost rank's weights are rebuilt).
    /// </summary>
    public static (long State, long Rows) NeighbourElements(DeepSeekConfig config, ParallelLayout layout, int rank)
    {
        if (layout.Dp < 2) return (0, 0);
        int next = layout.Rank(layout.StageOfRank(rank), (layout.ReplicaOfRank(rank) + 1) % layout.Dp);
        var (_, experts) = LocalParts(config, layout, next);
        int holders = layout.Dp / layout.Ep;
        long expertRows = layout.Ep == 1 ? 0 : layout.Zero >= 1 ? (experts + holders - 1) / holders : holders == 1 ? experts : 0;
        return layout.Zero >= 1 ? (ShardParameters(config, layout, next), layout.Zero >= 3 ? ShardParameters(config, layout, next) : expertRows) : (expertRows, expertRows);
    }

    public static RankMemory Predict(DeepSeekConfig config, ParallelLayout layout, int rank, MemoryInputs inputs)
    {
        var (param, moment, master, act) = ElementBytes(inputs.Precision);
        long local = LocalParameters(config, layout, rank);
        long shard = ShardParameters(config, layout, rank);
        var (neighbour, neighbourRows) = inputs.Redundancy ? NeighbourElements(config, layout, rank) : (0, 0);
        // In bf16 the neighbour's parameter rows are its master rows (rounded on a reshard): only without a master are they copied.
        long parameters = ((layout.Zero >= 3 ? shard : local) + (master == 0 ? neighbourRows : 0)) * param;
        long words = (layout.Zero >= 2 ? shard : local) * ExactWordBytes;
        long gradients = local * param + words + Math.Min(local, ExactScratchElements) * 8;
        long optimizer = ((layout.Zero >= 1 ? shard : local) + neighbour) * (2L * moment + master);
        if (layout.Zero < 3) return new RankMemory(rank, parameters, gradients, words, optimizer, Activations(config, layout, rank, inputs, act));
        var (outside, largest, largestPair) = LayerParts(config, layout, rank);
        // The trainer overlaps ZeRO-3's exchanges without ep only (ZeroParameters.Overlap).
        bool overlap = inputs.Zero3Overlap && layout.Ep == 1;
        // Only a CPU collective prefetches the next layer's gather (its exchange thread); CUDA's exchanges run inline on
        // the default stream (OrderedExchange.RunsOnThread), so one layer is gathered at a time there.
        bool prefetch = overlap && inputs.Device == DeviceType.CPU;
        long gathered = (outside + (prefetch ? largestPair : largest)) * param;
        if (overlap)
        {
            // The .grads peak while a layer's backward ends: its own and those outside the layers but the embedding's
            // (its backward is the last, after every layer's); at the end of the backward, all of those outside.
            long embedding = layout.StageOfRank(rank) == 0 && !config.TieWordEmbeddings ? (long)config.VocabSize * config.HiddenSize : 0;
            gradients = Math.Max(outside - embedding + largest, outside) * param + words + Math.Min(local, ExactScratchElements) * 8;
        }
        return new RankMemory(rank, parameters, gradients, words, optimizer, Activations(config, layout, rank, inputs with { Recompute = "full" }, act), gathered);
    }

    /// <summary>
    /// ZeRO-3's gather groups: the parameters outside the decoder layers, the largest layer, and the largest two layers
    /// that run one after the other (main layers, then MTP blocks, each in order), each layer with its 1/ep of the routed experts.
    /// </summary>
    static (long Outside, long Largest, long LargestPair) LayerParts(DeepSeekConfig config, ParallelLayout layout, int rank)
    {
        var layers = layout.Stages[layout.StageOfRank(rank)];
        int mtpLayers = layout.StageOfRank(rank) == layout.Pp - 1 ? config.NumNextnPredictLayers : 0;
        long inLayers = 0, largest = 0, pair = 0, previous = 0;
        for (int l = layers.FirstLayer; l < layers.End + mtpLayers; l++)
        {
            int index = l < layers.End ? l : config.NumHiddenLayers + (l - layers.End);
            long layer = config.LayerParameterCount(index) - config.RoutedExpertParameterCount(index) + config.RoutedExpertParameterCount(index) / layout.Ep;
            if (l == layers.End) previous = 0; // the first MTP block follows no layer of the forward's order
            inLayers += layer;
            largest = Math.Max(largest, layer);
            pair = Math.Max(pair, previous + layer);
            previous = layer;
        }
        return (LocalParameters(config, layout, rank) - inLayers, largest, pair);
    }

    public static IReadOnlyList<RankMemory> PredictAll(DeepSeekConfig config, ParallelLayout layout, MemoryInputs inputs) =>
        Enumerable.Range(0, layout.WorldSize).Select(r => Predict(config, layout, r, inputs)).ToList();

    /// <summary>
    /// Throws <see cref="PlanDoesNotFitException"/> naming the layout, the largest rank's predicted bytes by kind, and
    /// <paramref name="budgetBytes"/> (<paramref name="budgetSource"/> says whose memory that is) when some rank exceeds it.
    /// </summary>
    public static RankMemory CheckFits(DeepSeekConfig config, ParallelLayout layout, MemoryInputs inputs, long budgetBytes, string budgetSource)
    {
        var largest = PredictAll(config, layout, inputs).MaxBy(m => m.Total)!;
        if (largest.Total > budgetBytes)
            throw new PlanDoesNotFitException(
                $"the plan dp {layout.Dp} x pp {layout.Pp}, ep {layout.Ep}, zero {layout.Zero}, {inputs.Precision}, recompute {inputs.Recompute} does not fit: " +
                $"{largest} predicted (activations estimated), against {RankMemory.Gib(budgetBytes)} of {budgetSource}. " +
                "Shard more (a higher zero, ep, pp) or recompute activations, or give each rank more memory.");
        return largest;
    }

    /// <summary>
    /// Activation bytes at their peak in a step: what each micro-batch's forward keeps, times the micro-batches the stage
    /// holds at once, plus what the one backward running at a time adds at its largest (an estimate): on the last stage
    /// the heads' cross-entropy gradients (<see cref="CrossEntropyBackwardBytes"/>), while everything is kept. Under full
    /// recompute (and ZeRO-3, which recomputes every layer) the backward runs in phases: first the heads' cross-entropies, with
    /// everything kept; then, the heads' fp32 log-softmax and copies freed, each layer rerun and differentiated alone
    /// (<see cref="FullRecomputeBackwardBytes"/>).
    /// </summary>
    static long Activations(DeepSeekConfig c, ParallelLayout layout, int rank, MemoryInputs inputs, int bytes)
    {
        int stage = layout.StageOfRank(rank);
        var layers = layout.Stages[stage];
        long tokens = (long)inputs.MicroBatch * inputs.SeqLen;
        long perMicroBatch = 0;
        int mtpLayers = stage == layout.Pp - 1 ? c.NumNextnPredictLayers : 0;
        for (int l = layers.FirstLayer; l < layers.End + mtpLayers; l++) perMicroBatch += LayerActivationBytes(c, l, inputs);
        long head = stage == layout.Pp - 1 ? (1 + mtpLayers) * HeadBytesPerToken(c, inputs) + mtpLayers * MtpInputBytesPerToken(c, inputs) : 0;
        int inFlight = layout.Pp == 1 ? 1 : inputs.PipelineSchedule == "gpipe" ? Math.Max(1, inputs.MicroBatchesPerStep) : Math.Min(Math.Max(1, inputs.MicroBatchesPerStep), layout.Pp - stage);
        long backward = inputs.Recompute == "full" ? FullRecomputeBackwardBytes(c, layout, rank, inputs)
                        : stage == layout.Pp - 1 ? CrossEntropyBackwardBytes(c, inputs) : 0;
        return inFlight * (perMicroBatch + tokens * head) + backward;
    }

    /// <summary>
    /// What full recompute's backward of one micro-batch adds, at its peak, to what the forward kept (the order the
    /// autograd engine runs it in, measured: <c>MemoryPlanTests.AWholeModelPeaksWithinATenthOfThePlannersActivations</c>).
    /// The larger of two phases:
    /// <list type="bullet">
    /// <item>the heads' cross-entropies, one at a time, with everything kept: nll's gradient and log-softmax's input
    /// gradient, two fp32 tensors as wide as the vocabulary (last stage only);</item>
    /// <item>the layers, rerun one at a time from the last: the largest layer's whole set and its parameters' gradients
    /// (ActivationRecompute's backward adds those into the .grads, counted in <see cref="RankMemory.Gradients"/>, and
    /// frees them before it returns), plus the input gradient every rerun segment returns, which the micro-batch's dispose
    /// scope holds until the micro-batch ends; less what the heads' cross-entropies freed (each head's fp32 log-softmax
    /// and, from bf16 logits, its fp32 copy: the logits themselves stay, the caller's).</item>
    /// </list>
    /// </summary>
    static long FullRecomputeBackwardBytes(DeepSeekConfig c, ParallelLayout layout, int rank, MemoryInputs inputs)
    {
        int stage = layout.StageOfRank(rank);
        var layers = layout.Stages[stage];
        bool last = stage == layout.Pp - 1;
        int mtpLayers = last ? c.NumNextnPredictLayers : 0;
        long tokens = (long)inputs.MicroBatch * inputs.SeqLen, param = ElementBytes(inputs.Precision).Param;
        var (p, f, upcast) = ActivationSizes(inputs);
        long largestSet = 0, segmentGradients = 0;
        for (int l = layers.FirstLayer; l < layers.End + mtpLayers; l++)
        {
            int index = l < layers.End ? l : c.NumHiddenLayers + (l - layers.End);
            long parameters = c.LayerParameterCount(index) - c.RoutedExpertParameterCount(index) + c.RoutedExpertParameterCount(index) / layout.Ep;
            // The rerun layer's whole set beside its parameters' gradients, freed once added into their .grads.
            largestSet = Math.Max(largestSet, LayerActivationBytes(c, index, inputs with { Recompute = "none" }) + parameters * param);
            segmentGradients += tokens * c.HiddenSize * p; // its input's gradient, returned to the engine
        }
        if (!last) return largestSet + segmentGradients;
        long crossEntropy = CrossEntropyBackwardBytes(c, inputs);
        long freedByHeads = (1 + mtpLayers) * tokens * c.VocabSize * (f + upcast);
        return Math.Max(crossEntropy, largestSet + segmentGradients - freedByHeads);
    }

    /// <summary>
    /// What a head's cross-entropy backward adds while everything is still kept, the first thing a last stage's backward
    /// runs (one head at a time): nll's gradient and log-softmax's input gradient, two tensors as wide as the vocabulary
    /// in the loss's dtype (fp32 from bf16 logits).
    /// </summary>
    static long CrossEntropyBackwardBytes(DeepSeekConfig c, MemoryInputs inputs) =>
        (long)inputs.MicroBatch * inputs.SeqLen * c.VocabSize * 2 * ActivationSizes(inputs).F;

    /// <summary>
    /// Bytes decoder layer <paramref name="layer"/> (a main layer, or past <see cref="DeepSeekConfig.NumHiddenLayers"/> an
    /// MTP block's) keeps for the backward after its forward on one micro-batch, under <see cref="MemoryInputs.Recompute"/>:
    /// the tensors autograd saves in the code that runs (ActivationRecompute says what each mode recomputes). Its output is
    /// counted (the next layer's input, which that layer's norm or recompute keeps), its input is not (the layer before's
    /// output). Checked against one layer's measured bytes for each mode, dense and MoE, fp32 and bf16.
    /// </summary>
    public static long LayerActivationBytes(DeepSeekConfig c, int layer, MemoryInputs inputs)
    {
        var (p, f, upcast) = ActivationSizes(inputs);
        long index = 8, tokens = (long)inputs.MicroBatch * inputs.SeqLen, h = c.HiddenSize;
        if (inputs.Recompute == "full") return tokens * h * p; // the output alone: the layer's graph is made again in backward
        if (inputs.Recompute != "none" && inputs.Recompute != "selective")
            throw new ArgumentException($"recompute '{inputs.Recompute}': expected none, full or selective", nameof(inputs));
        bool selective = inputs.Recompute == "selective";
        // The layer's first norm reads the layer's input (not counted here); the second reads x + attention, new.
        long firstNorm = NormBytes(h, inputs, newInput: false);
        long secondNorm = NormBytes(h, inputs, newInput: true);
        long swiglu = (selective ? 3 : 4) * p; // gate, up, (silu(gate) unless recomputed,) their product: per intermediate unit
        // The output, where the next layer keeps it: a plain bf16 norm keeps its fp32 copy instead (counted there).
        long output = upcast > 0 && !selective ? 0 : h * p;
        long perToken = firstNorm + AttentionBytesPerToken(c, inputs) + secondNorm + output;
        if (layer < c.FirstKDenseReplace) return tokens * (perToken + c.IntermediateSize * swiglu);
        long k = c.NumExpertsPerTok, moe = c.MoeIntermediateSize;
        perToken += upcast * h + f * c.NRoutedExperts // the router's fp32 input, its sigmoid scores
                    + index * k + f * k + f           // the top-k indices, their scores and the scores' sum (the normalisation)
                    + 2 * index * k + f * k           // the sort order, each row's token, each row's weight
                    + 2 * k * h * p                   // the rows sorted by expert (the experts' input) and the experts' outputs
                    + k * h * f                       // the outputs times their weights (fp32 in bf16: the weights are), index_add's source
                    + k * moe * swiglu + c.NSharedExperts * moe * swiglu;
        // On a CPU in bf16 each expert's window is rounded up to 64 rows (DeepSeekMoe.AutoRowBucket) over a padded copy of
        // the rows: on average half a bucket more per expert, and the bucket's zero rows past the last.
        long bucket = inputs.Device == DeviceType.CPU && p == 2 ? 64 : 1;
        long padding = bucket == 1 ? 0 : c.NRoutedExperts * (bucket - 1) / 2 * moe * swiglu + (bucket - 1) * h * p;
        return tokens * perToken + padding;
    }

    /// <summary>
    /// Bytes per token the last stage keeps outside its decoder layers, for the main model (and again for each MTP module):
    /// the final norm (its input is the last layer's output), the logits, cross-entropy's fp32 log-softmax and, from bf16
    /// logits, the fp32 copy it was taken of (measured: libtorch keeps both); an MTP module also keeps its two input norms
    /// (the embeddings of the tokens ahead, new; the previous hidden states), their concatenation (eh_proj's input) and
    /// eh_proj's output (its block's input).
    /// </summary>
    static long HeadBytesPerToken(DeepSeekConfig c, MemoryInputs inputs)
    {
        var (p, _, upcast) = ActivationSizes(inputs);
        return NormBytes(c.HiddenSize, inputs, newInput: false) + (long)c.VocabSize * (p + 4 + upcast);
    }

    /// <summary>
    /// Activation element bytes: the compute dtype's (p), at least fp32's, which norms and routing compute in (f), and the
    /// fp32 copy a bf16 norm or router makes of its input and keeps (upcast; 0 in fp32).
    /// </summary>
    static (long P, long F, long Upcast) ActivationSizes(MemoryInputs inputs)
    {
        long p = ElementBytes(inputs.Precision).Activation, f = Math.Max(p, 4);
        return (p, f, p < f ? f : 0);
    }

    /// <summary>
    /// Bytes per token an RmsNorm over <paramref name="h"/> features keeps. Plain: its fp32 input (pow and the scaling; in
    /// fp32 the input itself), 1/rms, the normalized product in the input's dtype (the weight's gradient) and its output
    /// (its consumers' input); under selective recompute its input and output only. <paramref name="newInput"/>: the input
    /// is made here (such as x + attention) and counted with the norm — in bf16 a plain norm keeps its fp32 copy, not it;
    /// otherwise the input is counted where it is made, and only a bf16 norm's fp32 copy is added.
    /// </summary>
    static long NormBytes(long h, MemoryInputs inputs, bool newInput)
    {
        var (p, f, upcast) = ActivationSizes(inputs);
        if (inputs.Recompute == "selective") return (newInput ? 2 : 1) * h * p;
        return h * ((newInput ? f : upcast) + 2 * p) + f;
    }

    /// <summary>What an MTP module keeps besides its block and head (<see cref="HeadBytesPerToken"/>).</summary>
    static long MtpInputBytesPerToken(DeepSeekConfig c, MemoryInputs inputs)
    {
        var (p, _, upcast) = ActivationSizes(inputs);
        long h = c.HiddenSize, previousNorm = NormBytes(h, inputs, newInput: false), aheadNorm = NormBytes(h, inputs, newInput: true);
        long blockInput = upcast > 0 && inputs.Recompute == "none" ? 0 : h * p; // as a layer's output (LayerActivationBytes)
        return previousNorm + aheadNorm + 2 * h * p + blockInput;
    }

    /// <summary>
    /// Bytes one attention layer (MultiHeadLatentAttention, from its normed input to o_proj's input) keeps for the backward
    /// per token of a micro-batch of <see cref="MemoryInputs.SeqLen"/>-long sequences, in the form the layer will run: the
    /// model's own choice (<see cref="CausalAttention.PrefersWrittenOut(DeviceType, ScalarType, long)"/>) on the inputs'
    /// device, dtype and length. Written out, it keeps every (query, key) probability per head: softmax's fp32 output for
    /// its backward and, in bf16, the probabilities cast back for probs·V, 6 bytes a score (4 in fp32, where both are one
    /// tensor); the fused kernel keeps a log-sum-exp per query and head instead. Checked against a layer's measured bytes.
    /// </summary>
    public static long AttentionBytesPerToken(DeepSeekConfig c, MemoryInputs inputs)
    {
        long p = ElementBytes(inputs.Precision).Activation, f = Math.Max(p, 4); // RmsNorm and softmax compute in at least fp32
        long heads = c.NumAttentionHeads, S = inputs.SeqLen, Q = c.QkHeadDim, V = c.VHeadDim;
        // A latent's RmsNorm: its fp32 input (squared), 1/rms, the normalized product cast back (the weight's gradient)
        // and the output (the up-projection's input). kv's latent is a view into kv_a_proj_with_mqa's output, which a
        // kept view keeps whole, the rope part too: the norm's input in fp32 (in bf16 it keeps a copy of the latent alone).
        // Selective recompute keeps only the latents, the up-projections' inputs.
        bool selective = inputs.Recompute == "selective";
        long Norm(long n) => n * (f + 2 * p) + f;
        long kvLatent = selective ? (c.KvLoraRank + c.QkRopeHeadDim) * p : Norm(c.KvLoraRank) + (p == f ? c.QkRopeHeadDim * p : 0);
        long bytes = (c.QLoraRank is int r ? selective ? r * p : Norm(r) : 0) + kvLatent
                     + 2 * heads * Q * p // queries and keys, each joined from its nope and rope parts
                     + heads * V * p;    // the heads' outputs joined: o_proj's input
        if (CausalAttention.PrefersWrittenOut(inputs.Device, ComputeType(inputs.Precision), S))
            return bytes + heads * (c.QkNopeHeadDim + V) * p // the values, a view into kv_b_proj's whole output, which probs·V keeps
                   + heads * S * (f + (p < f ? p : 0))        // the probabilities (see above)
                   + S / Math.Max(1, inputs.MicroBatch);      // the causal mask: one (T, S) of bools per micro-batch
        // The fused kernel's backward keeps the values (padded to the queries' width, a copy; unpadded, a view into
        // kv_b_proj's output), its output at that width, and one fp32 log-sum-exp per head.
        return bytes + heads * (V < Q ? Q : c.QkNopeHeadDim + V) * p + heads * Math.Max(Q, V) * p + heads * 4;
    }
}
