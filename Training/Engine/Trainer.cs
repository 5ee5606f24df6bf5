// The training loop of one data-parallel rank: schedule -> accumulate -> (reduce) -> clip -> step -> balance -> report.
using System.Diagnostics;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Perf;
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public sealed class Trainer : ITrainer
{
    public DeepSeekForCausalLM Model { get; }
    public AdamW Optimizer { get; }
    public TrainingOptions Options { get; }
    public LrSchedule Schedule { get; }
    public Device Device { get; }
    /// <summary>Optimizer steps completed; the next step is this number.</summary>
    public long Step { get; private set; }
    /// <summary>Samples of the global stream consumed by completed steps (step x global batch): the only data state.</summary>
    public long ConsumedSamples => Step * Options.GlobalBatch;
    public int Rank { get; }
    public int WorldSize { get; }
    /// <summary>ZeRO-3's sharded parameters (null otherwise): what this rank holds of them (<see cref="ZeroParameters.ResidentBytes"/>).</summary>
    public ZeroParameters? ShardedParameters => zeroParameters;
    /// <summary>Bytes of the exact gradient sum's int64 words this rank holds (1/dp of them under ZeRO-2); 0 before the first step.</summary>
    public long GradientWordBytes => expertZero?.WordBytes ?? (gradients is null ? 0 : (gradients.High.numel() + gradients.Low.numel()) * sizeof(long));
    /// <summary>Whether the exact gradient sum reads and writes AdamW's flat gradient buffers (known after the first step).</summary>
    public bool GradientsOverFlatBuffers => gradients?.OverFlat ?? false;
    /// <summary>
    /// The exact gradient sum's fast paths (on by default): its one-pass CPU kernels, and no sum at all for a standalone
    /// step of one micro-batch. The same gradient bits either way; off is the reference the bench compares against.
    /// </summary>
    public bool ExactSumFastPaths { get; set; } = true;
    /// <summary>The device's peak MFU is measured against, and where it came from.</summary>
    public HardwarePeak Peak { get; set; }

    readonly ISampleSource train;
    readonly ISampleSource? validation;
    readonly IGradientReducer? reducer;
    readonly double flopsPerToken;
    readonly bool ownsOptimizer;
    readonly ZeroStep? zero;
    readonly ExpertParallel? experts;
    readonly ExpertZeroStep? expertZero; // ep x ZeRO: two partitions with sums of their own (then gradients stays null)
    readonly ZeroParameters? zeroParameters; // ZeRO-3: the parameters live sharded (gathered per layer)
    ExactGradientSum? gradients;
    OverlappedGradientReduction? overlap; // plain dp with Options.OverlapGradientReduction: made at the first step (it maps the sum's words)

    public Trainer(DeepSeekForCausalLM model, TokenDataset train, TokenDataset? validation, TrainingOptions options,
                   Device device, HardwarePeak peakFlops, int rank = 0, int worldSize = 1, IGradientReducer? reducer = null)
        : this(model, new PermutedSamples(train, (ulong)options.Seed), validation, options, device, peakFlops, rank, worldSize, reducer)
    {
    }

    /// <summary>
    /// A trainer whose samples come from any source addressed by global index (a local dataset or the data service).
    /// <paramref name="peakFlops"/>: the device's peak (<see cref="HardwarePeak.For"/>); a bare number of FLOP/s converts.
    /// <paramref name="optimizer"/>: an existing AdamW over <paramref name="model"/>'s parameters whose moments carry on
    /// (an elastic worker keeps its live state across generations); the caller keeps owning it. Null: a fresh one.
    /// </summary>
    public Trainer(DeepSeekForCausalLM model, ISampleSource train, TokenDataset? validation, TrainingOptions options,
                   Device device, HardwarePeak peakFlops, int rank = 0, int worldSize = 1, IGradientReducer? reducer = null, AdamW? optimizer = null)
    {
        Options = options.Validated(worldSize);
        if (train.SeqLen != options.SeqLen) throw new ArgumentException($"dataset seq_len {train.SeqLen} differs from the options' {options.SeqLen}");
        if (train.SampleCount == 0) throw new ArgumentException($"the training data holds no sample of {options.SeqLen + 1} tokens");
        Model = model;
        Device = device;
        Rank = rank;
        WorldSize = worldSize;
        this.train = train;
        this.validation = validation is null ? null : new InOrderSamples(validation);
        this.reducer = reducer;
        Peak = peakFlops;
        Schedule = LrSchedule.Parse(options.Schedule, options.Lr, options.WarmupSteps, options.Steps, options.MinLrRatio, options.DecayFraction);
        ownsOptimizer = optimizer is null;
        Optimizer = optimizer ?? CreateOptimizer(model, options, rank, worldSize);
        (experts, this.reducer) = ExpertParallelTraining.Attach(model, Options.Ep, Optimizer, rank, worldSize, reducer);
        if (experts is not null && ZeroLayout(Options, worldSize) is { } layout)
            expertZero = new ExpertZeroStep(experts, Optimizer, experts.Collective, layout, rank, Options.Zero, ((BucketedGradientReducer)reducer!).BucketBytes);
        else zero = ZeroStepFor(Optimizer, Options, rank, worldSize, reducer);
        if (expertZero is not null && Options.Zero >= 3) zeroParameters = expertZero.ShardParameters(model);
        else if (zero is not null && Options.Zero >= 3)
        {
            // The gradient sum is laid out from the parameters' shapes: made while they are whole.
            gradients = zero.NewGradientSum([.. Optimizer.Slots.Select(s => s.Param)], Options.Zero);
            zeroParameters = new ZeroParameters(model, [.. Optimizer.Slots.Select(s => s.Param)], zero.Collective, zero.Layout, zero.BucketBytes);
            if (Options.Zero3Overlap) zeroParameters.Overlap(gradients, Options.ExchangeThread);
        }
        flopsPerToken = model.Config.TrainingFlopsPerToken(options.SeqLen, includeMtp: options.MtpWeight > 0);
        ActivationRecompute.Apply(model, ActivationRecompute.Parse(Options.Recompute));
        GroupedExperts.Apply(model, GroupedExperts.Parse(Options.Experts, Device.type));
    }

    /// <summary>
    /// The AdamW a trainer with these options creates: moments allocated up front for every parameter, or, with ZeRO on
    /// more than one rank, for rank <paramref name="rank"/>'s rows only (<see cref="ParallelLayout.ZeroRows"/>).
    /// </summary>
    public static AdamW CreateOptimizer(DeepSeekForCausalLM model, TrainingOptions options, int rank = 0, int worldSize = 1) =>
        new(ExpertParallelTraining.OptimizerOrder(model.named_parameters(), options.Ep).Select(p => (model.ToHfName(p.name), (Tensor)p.parameter)), ZeroLayout(options, worldSize) is { } layout ? (name, shape) => layout.ZeroRowsOfRank(shape, rank, ExpertParallel.IsExpertParameter(name)) : null)
        {
            Beta1 = options.Beta1, Beta2 = options.Beta2, WeightDecay = options.WeightDecay, Eps = options.Epsilon,
        };

    /// <summary>The data-parallel layout whose ZeRO shards the optimizer holds, or null when nothing is sharded.</summary>
    static ParallelLayout? ZeroLayout(TrainingOptions options, int worldSize) =>
        options.Zero > 0 && worldSize > 1 ? new ParallelLayout(worldSize, 1, [new StageLayers(0, 1)]) { Zero = options.Zero, Ep = options.Ep }.Validated() : null;

    static ZeroStep? ZeroStepFor(AdamW optimizer, TrainingOptions options, int rank, int worldSize, IGradientReducer? reducer)
    {
        if (ZeroLayout(options, worldSize) is not { } layout) return null;
        var collective = (reducer as BucketedGradientReducer)?.Collective
            ?? throw new ArgumentException($"zero {options.Zero} on {worldSize} ranks needs the data-parallel collective (a BucketedGradientReducer)");
        foreach (var slot in optimizer.Slots)
            if (slot.RowCount is null || (slot.RowStart, slot.RowCount.Value) != layout.ZeroRows(slot.Param.shape, rank))
                throw new ArgumentException($"the optimizer's state of '{slot.Name}' is not rank {rank}'s ZeRO shard of {worldSize} (rows {slot.RowStart}+{slot.RowCount?.ToString() ?? "all"})");
        var shards = new ZeroShards(layout, optimizer.Slots.Select(s => s.Param.shape).ToList());
        return new ZeroStep(collective, shards, (reducer as BucketedGradientReducer)!.BucketBytes, layout);
    }

    /// <inheritdoc/>
    public Action<StateChange>? BeforeStateChange { get; set; }

    /// <inheritdoc/>
    public double LrScale { get; set; } = 1;

    /// <summary>
    /// Runs one optimizer step over this rank's slice of the global batch. Each micro-batch's gradient is computed alone
    /// (the backward of its unscaled loss) and added to an exact sum; the sum over every rank's micro-batches, divided by
    /// their number, is the step's gradient: the same bits whatever the world size (see <see cref="ExactGradientSum"/>).
    /// </summary>
    public StepMetrics TrainStep()
    {
        using var hold = FinalizerHold.Enter(); // see FinalizerHold: TorchSharp's implicit Scalars must outlive the native calls
        Model.train();
        int accumulation = Options.Accumulation(WorldSize);
        int micro = Options.MicroBatch;
        double lr = Schedule.At(Step) * LrScale;
        var moeLayers = Model.MoeLayers().ToList();
        var stats = new StepStatistics(moeLayers.Select(m => m.LastLoad.Length));
        double dataS = 0, fwdS = 0, bwdS = 0, commS = 0, optS = 0;
        bool withMtp = Options.MtpWeight > 0 && Model.mtp.Count > 0;
        var total = Stopwatch.StartNew();
        // Rows a rollback or load wrote into the parameters since the last step (CheckpointTensors exposed them) become the
        // rank's own; then embedding, head and norms outside the layers are whole for the step (ZeroParameters).
        // Emptying them is ZeRO-3's first change to the parameters: a background checkpoint copy of the tensors
        // CheckpointTensors exposed must be done first (else it reads emptied storage and the save fails).
        if (zeroParameters is not null) BeforeStateChange?.Invoke(StateChange.ReleaseParameters);
        zeroParameters?.KeepOwnRowsAndRelease();
        zeroParameters?.GatherRest();

        if (expertZero is null)
        {
            gradients ??= zero?.NewGradientSum(Optimizer.Slots.Select(s => s.Param).ToList(), Options.Zero) ?? NewGradientSum();
            gradients.Clear();
            gradients.NativeCpu = ExactSumFastPaths;
        }
        else expertZero.Clear();
        if (OverlapsReduction) overlap ??= new OverlappedGradientReduction(Model, Optimizer, gradients!, ((BucketedGradientReducer)reducer!).Collective, ((BucketedGradientReducer)reducer!).BucketBytes) { ExchangeThread = Options.ExchangeThread };
        // This rank's contiguous share of the step's global batch, in micro-batches.
        long rankStart = ParallelLayout.ReplicaSamples(Step, Options.GlobalBatch, Rank, WorldSize).Start;
        for (int a = 0; a < accumulation; a++)
        {
            using var scope = NewDisposeScope();
            var sw = Stopwatch.StartNew();
            bool overlapped = overlap is not null && a == accumulation - 1; // earlier micro-batches only add locally
            using var armed = overlapped ? overlap!.Arm() : default; // abandoned if this micro-batch throws before EndBackward
            var batch = train.Fetch(rankStart + (long)a * micro, micro).to(Device);
            var input_BT = batch.narrow(1, 0, Options.SeqLen);
            var target_BT = batch.narrow(1, 1, Options.SeqLen);
            dataS += sw.Elapsed.TotalSeconds; sw.Restart();

            var output = Model.Forward(input_BT, withMtp: withMtp);
            var lm = CrossEntropy(output.Logits_BTV, target_BT);
            var loss = lm;
            if (withMtp && output.MtpLogits.Count > 0)
            {
                // Depth k at position i predicts token i+k+1: targets are the batch shifted by k+1.
                Tensor? mtpTotal = null;
                for (int k = 1; k <= output.MtpLogits.Count; k++)
                {
                    var logits = output.MtpLogits[k - 1];
                    var ce = CrossEntropy(logits, batch.narrow(1, k + 1, logits.shape[1]));
                    mtpTotal = mtpTotal is null ? ce : mtpTotal + ce;
                }
                var mtp = mtpTotal! / output.MtpLogits.Count;
                stats.Mtp.Add(ValueOf(mtp));
                loss = loss + mtp * Options.MtpWeight;
            }
            if (output.AuxLoss is { } aux) { stats.Aux.Add(ValueOf(aux)); loss = loss + aux; }
            stats.Lm.Add(ValueOf(lm));
            stats.AddLoads(moeLayers.Select(m => m.LastLoad).ToList());
            fwdS += sw.Elapsed.TotalSeconds; sw.Restart();

            if (overlapped)
            {
                loss.backward();
                overlap!.EndBackward();
                bwdS += sw.Elapsed.TotalSeconds;
                continue;
            }
            loss.backward();
            if (expertZero is not null) expertZero.AddMicroBatch();
            else if (zeroParameters is { ScattersLayers: true }) zeroParameters.ScatterRest(); // the layers' went during the backward
            else
            {
                zeroParameters?.NoteHoldings();
                // A standalone step of one micro-batch has no other term here or elsewhere: nothing to sum, the same mean.
                if (reducer is null && accumulation == 1 && ExactSumFastPaths) gradients!.AddOnlyTerm();
                else gradients!.AddAndClearGradients();
                experts?.AddSourceGradients(gradients); // with ep: the other sources' expert gradients, each a term of its own
            }
            bwdS += sw.Elapsed.TotalSeconds;
        }

        var opt = Stopwatch.StartNew();
        if (reducer is not null)
        {
            var c = Stopwatch.StartNew();
            if (expertZero is not null) expertZero.ReduceAndWriteMean(Options.GlobalBatch / micro);
            else if (overlap is not null) overlap.Complete(); // the buckets went during the backward: wait for the last ones
            else if (zero is null) reducer.SumGradients(gradients!);
            else zero.ReduceScatter(gradients!);
            stats.SumOver(reducer);
            commS = c.Elapsed.TotalSeconds;
        }
        // The sums are over every rank's micro-batches, or this rank's alone when it has no reducer (the standalone trainer).
        int counted = reducer is null ? accumulation : Options.GlobalBatch / micro;
        zeroParameters?.MaterializeOwnRows(); // ZeRO-3: the update reads and writes this rank's rows only
        if (zeroParameters is { ScattersLayers: true }) zeroParameters.GiveGradients(); // (their rows only, as the parameters')
        if (zero is not null) gradients!.WriteShardMean(counted, zero.Shard);
        else if (expertZero is null) gradients!.WriteMean(counted); // (ep x ZeRO wrote its rows' mean in ReduceAndWriteMean)
        double gradNorm = expertZero?.ClipGradNorm(Optimizer, Options.ClipNorm) ?? experts?.ClipGradNorm(Optimizer, Options.ClipNorm) ?? zero?.ClipGradNorm(Optimizer, Options.ClipNorm) ?? Optimizer.ClipGradNorm(Options.ClipNorm);
        // The guard: a NaN/Inf loss or norm is never applied. Every rank holds the same summed words (under ZeRO, the norm
        // is summed over every shard), hence the same norm and loss, and skips with the others without a word exchanged.
        bool skipped = !(double.IsFinite(gradNorm) && double.IsFinite(stats.Lm.Value));
        BeforeStateChange?.Invoke(StateChange.Update);
        if (!skipped)
        {
            Optimizer.Step(lr);
            if (zeroParameters is not null) { } // ZeRO-3 gathers each layer when it next runs: no all-gather here
            else if (zero is not null || expertZero is not null)
            {
                var c = Stopwatch.StartNew();
                if (expertZero is not null) expertZero.AllGatherParameters();
                else zero!.AllGatherParameters(Optimizer);
                commS += c.Elapsed.TotalSeconds;
            }
            if (Options.BiasUpdateSpeed > 0)
                for (int l = 0; l < moeLayers.Count; l++) moeLayers[l].gate.UpdateBias(stats.Loads[l], Options.BiasUpdateSpeed);
        }
        zeroParameters?.KeepOwnRowsAndRelease();
        optS = opt.Elapsed.TotalSeconds - commS;
        Step++;

        double seconds = total.Elapsed.TotalSeconds;
        double tokens = (double)Options.GlobalBatch * Options.SeqLen / WorldSize;
        double tps = tokens / seconds;
        double auxMean = stats.Aux.Value / counted;
        return new StepMetrics(
            Step, stats.Lm.Value / counted, withMtp ? stats.Mtp.Value / counted : null, auxMean > 0 ? auxMean : null,
            lr, gradNorm, tps, Peak.Mfu(tps * flopsPerToken).Ratio,
            new StepTimes(dataS, fwdS, bwdS, commS, optS), stats.Loads) { AchievedFlops = tps * flopsPerToken, Peak = Peak, Skipped = skipped };
    }

    /// <summary>
    /// Whether the data-parallel all-reduce overlaps the last micro-batch's backward (<see cref="OverlappedGradientReduction"/>):
    /// <see cref="TrainingOptions.OverlapGradientReduction"/> on plain data parallelism (zero 0, ep 1, more than one rank).
    /// </summary>
    public bool OverlapsReduction => Options.OverlapGradientReduction && WorldSize > 1 && reducer is BucketedGradientReducer
        && zero is null && expertZero is null && experts is null && zeroParameters is null;

    /// <summary>Whether the overlapped all-reduce's last step ran on an exchange thread (null: no overlap yet); tests of the CUDA shape read it.</summary>
    internal bool? OverlapExchangedOnThread => overlap?.ExchangedOnThread;

    /// <summary>The overlapped reduction's counts (buckets in all, and those all-reduced during a backward); zeros without it.</summary>
    public (long Buckets, long DuringBackward) OverlappedBuckets => (overlap?.Buckets ?? 0, overlap?.BucketsDuringBackward ?? 0);

    /// <summary>
    /// With the flat optimizer (<see cref="AdamW.Flat"/>, read at the first step) and whole parameters, the sum's words
    /// follow AdamW's flat gradient buffers and it reads and writes them directly; otherwise (and with ep, whose extra
    /// terms skip the dense parameters' words) it copies each parameter's gradient in and out: the reference path.
    /// </summary>
    ExactGradientSum NewGradientSum()
    {
        var parameters = Optimizer.Slots.Select(s => s.Param).ToList();
        if (!Optimizer.Flat || experts is not null || Optimizer.AdoptGradients() is null) return new ExactGradientSum(parameters);
        return ExactGradientSum.OverFlatBuffers(() => Optimizer.AdoptGradients()!);
    }

    /// <summary>A loss as a double: exact for float32 losses (as before), and keeps every digit of a float64 run's.</summary>
    internal static double ValueOf(Tensor loss) => loss.dtype switch
    {
        ScalarType.Float64 => loss.item<double>(),
        ScalarType.Float32 => loss.item<float>(),
        _ => loss.to_type(ScalarType.Float32).item<float>(),
    };

    static Tensor CrossEntropy(Tensor logits_BTV, Tensor target_BT) => Evaluation.CrossEntropy(logits_BTV, target_BT);

    /// <summary>Mean LM cross-entropy (nats/token) over the first EvalBatches micro-batches of the validation set; NaN without one.</summary>
    public double Evaluate() => validation is null ? double.NaN : Evaluate(validation, Options.EvalBatches);

    /// <inheritdoc/>
    /// <remarks>Under ZeRO-3 every rank must evaluate together: each layer gathers its parameters from every rank.</remarks>
    public double Evaluate(ISampleSource validation, int batches) =>
        Evaluating(model => Evaluation.LmLoss(model, validation, Options.MicroBatch, Device, batches));

    /// <summary>
    /// <paramref name="use"/> run on <see cref="Model"/> without gradients (a validation loss, evaluation tasks' scores). Under
    /// ZeRO-3 the parameters are empty between steps: the ones outside the decoder layers are gathered first (each layer
    /// gathers its own while it runs) and all are emptied after, so every rank must call it together, as for a step.
    /// </summary>
    public T Evaluating<T>(Func<DeepSeekForCausalLM, T> use)
    {
        if (zeroParameters is null) return use(Model);
        zeroParameters.KeepOwnRowsAndRelease();
        zeroParameters.GatherRest();
        try { return use(Model); }
        finally { zeroParameters.ReleaseAll(); }
    }

    /// <inheritdoc/>
    /// <remarks>
    /// Under ZeRO-3 every parameter gets its full shape with this rank's rows filled (the rows a ZeRO layout's rank writes;
    /// the others are not read), so that the catalog and the writer see whole shapes; the next step empties them again.
    /// </remarks>
    public IReadOnlyDictionary<string, Tensor> CheckpointTensors()
    {
        zeroParameters?.MaterializeOwnRows();
        return Checkpoints.CheckpointTensors.Collect(Model, Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value);
    }

    /// <summary>Positions the trainer after <paramref name="step"/> completed steps (used when resuming).</summary>
    public void ResumeAt(long step, long optimizerSteps)
    {
        Step = step;
        Optimizer.StepCount = optimizerSteps;
    }

    public void Dispose()
    {
        zeroParameters?.Dispose(); // first: its exchanges in flight add into the gradient sum
        overlap?.Dispose(); // before the sum: its thread may still add into the words
        gradients?.Dispose();
        expertZero?.Dispose();
        if (ownsOptimizer) Optimizer.Dispose();
    }
}
