// The training loop of one pipeline stage of one data-parallel replica: 1F1B (or GPipe) forwards and backwards, dp reduce, global clip, step.
using System.Diagnostics;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Perf;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// Trains stage <see cref="PipelineStage.Index"/> of replica <see cref="Replica"/> in step with the other stages (over
/// <see cref="PipelineLinks"/>) and the other replicas of this stage (over the stage's <see cref="IGradientReducer"/>).
/// The step is the single-process <see cref="Trainer"/>'s, cut at stage boundaries:
/// <list type="number">
/// <item>the forwards and backwards of the step's micro-batches (the gradient-accumulation micro-batches): a forward
/// receives (B, T, D) hidden states — and with MTP the embeddings — from the stage before and sends its own on; a
/// backward receives the gradient of its outputs from the stage after and sends the gradient of its inputs back. Each
/// backward's parameter gradients go into an exact sum (<see cref="ExactGradientSum"/>), so their order does not matter.
/// <see cref="TrainingOptions.PipelineSchedule"/> orders them: 1F1B (warm-up forwards, then one
/// forward and one backward in turn, then the cool-down backwards) or GPipe (every forward, then every backward);</item>
/// <item>the exact data-parallel sum of the stage's gradients, expert loads and losses within the stage's dp group;</item>
/// <item>one exchange along the pipeline of each stage's gradient sum of squares, losses and expert loads: the clip uses
/// the global norm, and every stage reports the loss that only the last one computes;</item>
/// <item>AdamW on the owned parameters and the routing-bias update of the stage's own MoE layers.</item>
/// <item>With ep &gt; 1 the stage's replicas are its ep groups (ParallelLayout): its MoE layers dispatch tokens over the
/// stage's collective, each source's expert gradients are a term of their own as in the data-parallel trainer, and the
/// stage's share of the norm counts every expert of the stage once (ExpertParallel.SumOfSquares).</item>
/// </list>
/// 1F1B by default: stage s holds at most pp − s micro-batches' activations where GPipe holds all of them. In its steady
/// phase both ends of a link send at once, which <see cref="StageLink.SendAndReceive"/> makes safe (see docs/decisions.md).
/// </summary>
public sealed partial class PipelineTrainer : ITrainer
{
    public PipelineStage Stage { get; }
    public AdamW Optimizer { get; }
    public TrainingOptions Options { get; }
    public LrSchedule Schedule { get; }
    public Device Device { get; }
    /// <summary>Optimizer steps completed; the next step is this number.</summary>
    public long Step { get; private set; }
    public long ConsumedSamples => Step * Options.GlobalBatch;
    /// <summary>This stage's data-parallel replica and the number of replicas.</summary>
    public int Replica { get; }
    public int Replicas { get; }
    /// <summary>This stage's device's peak (see <see cref="Trainer.Peak"/>).</summary>
    public HardwarePeak Peak { get; set; }
    /// <inheritdoc/>
    public double LrScale { get; set; } = 1;

    /// <inheritdoc/>
    public Action<StateChange>? BeforeStateChange { get; set; }

    readonly ISampleSource train;
    readonly PipelineLinks links;
    readonly IGradientReducer? reducer;
    readonly ExpertParallel? expertParallel;
    readonly ZeroStep? zero; // zero 1/2: the stage's optimizer state (and gradient sums) sharded over its replicas
    readonly ExpertZeroStep? expertZero; // ep x zero 1/2: two partitions with sums of their own (then gradients stays null)
    readonly ZeroParameters? zeroParameters; // zero 3: the stage's parameters live sharded over its replicas (gathered per layer)
    readonly double flopsPerToken;
    readonly bool ownsOptimizer;
    ExactGradientSum? gradients;

    /// <summary>
    /// <paramref name="optimizer"/>: an AdamW over exactly <paramref name="stage"/>'s parameters whose moments carry on;
    /// null: a fresh one (<see cref="CreateOptimizer"/>). <paramref name="reducer"/> spans this stage's replicas.
    /// </summary>
    public PipelineTrainer(PipelineStage stage, ISampleSource train, TrainingOptions options, Device device, HardwarePeak peakFlops,
                           PipelineLinks links, int replica = 0, int replicas = 1, IGradientReducer? reducer = null, AdamW? optimizer = null)
    {
        Options = options.Validated(replicas);
        if (train.SeqLen != options.SeqLen) throw new ArgumentException($"dataset seq_len {train.SeqLen} differs from the options' {options.SeqLen}");
        if (train.SampleCount == 0) throw new ArgumentException($"the training data holds no sample of {options.SeqLen + 1} tokens");
        if (links.Stage != stage.Index || links.Stages != stage.Layout.Pp)
            throw new ArgumentException($"the links are those of stage {links.Stage} of {links.Stages}, the stage is {stage.Index} of {stage.Layout.Pp}");
        if (replica < 0 || replica >= replicas) throw new ArgumentOutOfRangeException(nameof(replica), replica, $"replica must be in [0, {replicas})");
        Stage = stage;
        Device = device;
        Replica = replica;
        Replicas = replicas;
        this.train = train;
        this.links = links;
        Peak = peakFlops;
        Schedule = LrSchedule.Parse(options.Schedule, options.Lr, options.WarmupSteps, options.Steps, options.MinLrRatio, options.DecayFraction);
        ownsOptimizer = optimizer is null;
        Optimizer = optimizer ?? CreateOptimizer(stage, options, replica, replicas);
        // ep > 1: the stage's replicas form its ep groups; its MoE layers exchange tokens over the stage's collective.
        (expertParallel, this.reducer) = ExpertParallelTraining.Attach(stage.Model, Options.Ep, Optimizer, replica, replicas, reducer);
        zero = StageZero.For(Optimizer, Options, replica, replicas, this.reducer);
        expertZero = StageZero.ForExperts(expertParallel, Optimizer, Options, replica, replicas, reducer);
        zeroParameters = StageZero.ShardParameters(stage, expertZero, Options);
        if (zero is not null && Options.Zero >= 3)
        {
            // The gradient sum is laid out from the parameters' shapes: made while they are whole.
            gradients = zero.NewGradientSum([.. Optimizer.Slots.Select(s => s.Param)], Options.Zero);
            zeroParameters = StageZero.ShardParameters(stage, Optimizer, zero, Options, gradients);
        }
        flopsPerToken = stage.Model.Config.TrainingFlopsPerToken(options.SeqLen, includeMtp: options.MtpWeight > 0);
        ActivationRecompute.Apply(stage.Model, ActivationRecompute.Parse(Options.Recompute));
        GroupedExperts.Apply(stage.Model, GroupedExperts.Parse(Options.Experts, Device.type));
    }

    /// <summary>
    /// The AdamW of a stage: moments for its own parameters only (with ep, its routed experts last), and with ZeRO on
    /// more than one replica only for replica <paramref name="replica"/>'s rows of them (<see cref="StageZero"/>).
    /// </summary>
    public static AdamW CreateOptimizer(PipelineStage stage, TrainingOptions options, int replica = 0, int replicas = 1) =>
        new(options.Ep > 1 ? stage.Parameters.OrderBy(p => ExpertParallel.IsExpertParameter(p.Name)) : stage.Parameters,
            StageZero.Rows(options, replica, replicas))
            { Beta1 = options.Beta1, Beta2 = options.Beta2, WeightDecay = options.WeightDecay, Eps = options.Epsilon };

    /// <summary>What one micro-batch leaves for its backward: the tensors to differentiate and the received leaves whose gradients go back.</summary>
    sealed record Pending(StageOutput Output, Tensor? Loss, Tensor? Input, Tensor? EmbeddingsIn, List<IDisposable> Held, long Bytes);

    /// <summary>
    /// The most micro-batches whose activations this stage held at once during the last step (a forward done, its
    /// backward not yet): pp − s at most on stage s under 1F1B, all of the step's micro-batches under GPipe.
    /// </summary>
    public int PeakHeldMicroBatches { get; private set; }

    /// <summary>
    /// The most bytes of tensors those held micro-batches kept at once during the last step, when
    /// <see cref="MeasureHeldBytes"/> is set (0 otherwise): what each forward left for its backward as tensors of its own
    /// (every module's output, the received inputs), counted once per storage. The tensors autograd saves inside a
    /// module are not visible here, so this is a lower bound of the activations held.
    /// </summary>
    public long PeakHeldTensorBytes { get; private set; }

    /// <summary>
    /// Measure <see cref="PeakHeldTensorBytes"/>: two native calls per tensor a forward leaves behind, so it is off in
    /// training and on where the memory of a schedule is being looked at.
    /// </summary>
    public bool MeasureHeldBytes { get; init; }

    /// <summary>Runs one optimizer step of this stage over this replica's slice of the global batch.</summary>
    public StepMetrics TrainStep()
    {
        using var hold = FinalizerHold.Enter(); // see FinalizerHold: TorchSharp's implicit Scalars must outlive the native calls
        var model = Stage.Model;
        model.train();
        int accumulation = Options.Accumulation(Replicas);
        int micro = Options.MicroBatch;
        long T = Options.SeqLen, D = model.Config.HiddenSize;
        double lr = Schedule.At(Step) * LrScale;
        var moeLayers = Stage.MoeLayers().ToList();
        var stats = new StepStatistics(moeLayers.Select(m => m.LastLoad.Length));
        double dataS = 0, fwdS = 0, bwdS = 0, commS = 0, optS = 0;
        bool withMtp = Options.MtpWeight > 0 && model.mtp.Count > 0;
        // With MTP, stage 0's embeddings travel beside the hidden states (PipelineStage explains why).
        bool carryEmbeddings = withMtp && Stage.Layout.Pp > 1;
        var dtype = model.model.embed_tokens.weight!.dtype;
        long[] shape = [micro, T, D];
        var total = Stopwatch.StartNew();
        var sw = new Stopwatch();
        BeginShardedStep();

        if (expertZero is not null) expertZero.Clear();
        else (gradients ??= zero?.NewGradientSum([.. Optimizer.Slots.Select(s => s.Param)], Options.Zero) ?? new ExactGradientSum([.. Optimizer.Slots.Select(s => s.Param)])).Clear();
        long rankStart = ParallelLayout.ReplicaSamples(Step, Options.GlobalBatch, Replica, Replicas).Start;
        int frames = carryEmbeddings ? 2 : 1; // tensors per micro-batch on a link, each way
        var pending = new Queue<Pending>(accumulation); // forwards awaiting their backward, oldest first
        int held = 0;
        long heldBytes = 0;
        PeakHeldMicroBatches = 0;
        PeakHeldTensorBytes = 0;

        // ---- Link operations: null or nothing at the ends of the pipeline; their time is communication ----
        // A stage's frames from the stage before (a forward's inputs) or after (a backward's gradients); null at the ends.
        Tensor[]? ReceiveFrom(StageLink? link)
        {
            if (link is null) return null;
            var c = Stopwatch.StartNew();
            var received = Enumerable.Range(0, frames).Select(_ => link.Receive(shape, dtype, Device)).ToArray();
            commS += c.Elapsed.TotalSeconds;
            return received;
        }
        Tensor[]? ReceiveForward() => ReceiveFrom(links.Previous);
        Tensor[]? ReceiveBackward() => ReceiveFrom(links.Next);
        Tensor[] Outputs(Pending p) => carryEmbeddings ? [p.Output.Hidden_BTD, p.Output.Embeddings_BTD!] : [p.Output.Hidden_BTD];
        void SendForward(Pending p)
        {
            if (Stage.IsLast) return;
            var c = Stopwatch.StartNew();
            foreach (var t in Outputs(p)) links.Next!.Send(t);
            commS += c.Elapsed.TotalSeconds;
        }
        void SendBackward(Tensor[]? gradients)
        {
            if (gradients is null) return; // the first stage sends nothing back
            var c = Stopwatch.StartNew();
            foreach (var g in gradients) links.Previous!.Send(g);
            commS += c.Elapsed.TotalSeconds;
        }
        // 1F1B's steady phase: the neighbour sends at the same time (StageLink.SendAndReceive).
        Tensor[]? SendForwardReceiveBackward(Pending p)
        {
            if (Stage.IsLast) return null;
            var c = Stopwatch.StartNew();
            var received = links.Next!.SendAndReceive(Outputs(p), frames, shape, dtype, Device);
            commS += c.Elapsed.TotalSeconds;
            return received;
        }
        Tensor[]? SendBackwardReceiveForward(Tensor[]? gradients)
        {
            if (Stage.IsFirst) return null;
            var c = Stopwatch.StartNew();
            var received = links.Previous!.SendAndReceive(gradients!, frames, shape, dtype, Device);
            commS += c.Elapsed.TotalSeconds;
            return received;
        }

        // ---- One micro-batch's forward: its graph (and what it received) is held until its backward ----
        Pending Forward(int a, Tensor[]? received)
        {
            using var scope = NewDisposeScope();
            var c = Stopwatch.StartNew();
            Tensor? batch = Stage.IsFirst || Stage.IsLast ? train.Fetch(rankStart + (long)a * micro, micro).to(Device) : null;
            dataS += c.Elapsed.TotalSeconds;

            var input = received?[0].requires_grad_(true);
            var embIn = carryEmbeddings ? received?[1].requires_grad_(Stage.IsLast) : null;
            c.Restart();
            var output = Stage.Forward(batch?.narrow(1, 0, T), input, embIn, Stage.IsLast ? batch : null, withMtp);
            Tensor? loss = null;
            if (Stage.IsLast)
            {
                loss = output.LmLoss!;
                stats.Lm.Add(Trainer.ValueOf(output.LmLoss!));
                if (output.MtpLoss is { } mtp) { stats.Mtp.Add(Trainer.ValueOf(mtp)); loss = loss + mtp * Options.MtpWeight; }
            }
            if (output.AuxLoss is { } aux) { stats.Aux.Add(Trainer.ValueOf(aux)); if (loss is not null) loss = loss + aux; }
            stats.AddLoads(moeLayers.Select(m => m.LastLoad).ToList());
            fwdS += c.Elapsed.TotalSeconds;

            // Into the step's scope, so that an exception still frees them; Backward frees them as soon as it is done.
            var graph = scope.DisposablesView.ToList();
            scope.MoveToOuter(graph);
            List<IDisposable> keep = [.. graph, .. received ?? []];
            var p = new Pending(output, loss, input, embIn, keep, MeasureHeldBytes ? HeldBytes.Of(keep) : 0);
            pending.Enqueue(p);
            PeakHeldMicroBatches = Math.Max(PeakHeldMicroBatches, ++held);
            PeakHeldTensorBytes = Math.Max(PeakHeldTensorBytes, heldBytes += p.Bytes);
            return p;
        }

        // ---- The oldest micro-batch's backward: returns the gradients of its inputs, for the stage before ----
        Tensor[]? Backward(Tensor[]? fromNext)
        {
            var p = pending.Dequeue();
            var c = Stopwatch.StartNew();
            // Unscaled, as the single-process trainer: the mean over micro-batches is taken once, from the exact sum.
            if (Stage.IsLast) p.Loss!.backward();
            else
            {
                var roots = new List<Tensor> { p.Output.Hidden_BTD };
                var grads = new List<Tensor> { fromNext![0] };
                // The first stage owns the embeddings the MTP modules read: their gradient joins the layers' at the embedding.
                if (Stage.IsFirst && carryEmbeddings) { roots.Add(p.Output.Embeddings_BTD!); grads.Add(fromNext[1]); }
                // d(loss)/d(aux) of this stage's MoE layers, as in the single-process backward.
                if (p.Output.AuxLoss is { } aux) { roots.Add(aux); grads.Add(ones_like(aux)); }
                autograd.backward(roots, grads);
            }
            if (expertZero is not null) expertZero.AddMicroBatch(pending: true); // both partitions' terms, as below
            else if (zeroParameters is not null) AddShardedMicroBatch();
            else
            {
                gradients!.AddAndClearGradients();
                expertParallel?.AddSourceGradients(gradients, pending: true); // with ep: the other sources' expert gradients, a term each
            }
            bwdS += c.Elapsed.TotalSeconds;
            Tensor[]? back = null;
            if (!Stage.IsFirst)
            {
                var gradIn = p.Input!.grad ?? zeros(shape, dtype: dtype, device: Device);
                // The last stage returns the gradient of the embeddings its MTP modules read; a middle stage passes it on.
                back = !carryEmbeddings ? [gradIn]
                     : [gradIn, Stage.IsLast ? p.EmbeddingsIn!.grad ?? zeros(shape, dtype: dtype, device: Device) : fromNext![1]];
            }
            // The graph goes now, not at the end of the step: this is what 1F1B saves.
            foreach (var d in p.Held) d.Dispose();
            held--;
            heldBytes -= p.Bytes;
            return back;
        }

        // Backwards run in micro-batch order 0..m-1 under both schedules.
        using (NewDisposeScope())
        {
            if (Options.PipelineSchedule == "gpipe")
            {
                for (int a = 0; a < accumulation; a++)
                    SendForward(Forward(a, ReceiveForward()));
                for (int a = 0; a < accumulation; a++)
                    using (NewDisposeScope()) SendBackward(Backward(ReceiveBackward()));
            }
            else
            {
                // 1F1B (PipeDream-Flush, as Megatron's non-interleaved schedule): warm-up forwards fill the pipeline below
                // this stage, then each forward is followed by the backward of the oldest micro-batch, then the cool-down
                // backwards. Stage s holds at most pp - s micro-batches.
                int warmup = Math.Min(Stage.Layout.Pp - Stage.Index - 1, accumulation), steady = accumulation - warmup;
                for (int a = 0; a < warmup; a++)
                    SendForward(Forward(a, ReceiveForward()));
                var next = steady > 0 ? ReceiveForward() : null;
                for (int i = 0; i < steady; i++)
                {
                    var p = Forward(warmup + i, next);
                    using var scope = NewDisposeScope(); // the backward's gradients, received and sent
                    var back = Backward(SendForwardReceiveBackward(p));
                    if (i == steady - 1) SendBackward(back);
                    else
                    {
                        next = SendBackwardReceiveForward(back);
                        if (next is not null) scope.MoveToOuter(next); // the next forward's inputs, held with its graph
                    }
                }
                for (int a = 0; a < warmup; a++)
                    using (NewDisposeScope()) SendBackward(Backward(ReceiveBackward()));
            }
        }

        expertParallel?.DropLeaves();

        // ---- Reduce within the stage, clip over the pipeline, step ----
        var opt = Stopwatch.StartNew();
        double commBefore = commS;
        if (reducer is not null)
        {
            sw.Restart();
            // ZeRO: this replica's rows summed over the stage's replicas (under ep, its expert rows over their holders).
            if (expertZero is not null)
            {
                // ep x ZeRO-3: the mean goes into the .grads, a missing one (an expert no token of this stage reached)
                // made in the parameter's shape, which it has only with its rows exposed.
                ExposeOwnRows();
                expertZero.ReduceAndWriteMean(Options.GlobalBatch / micro);
            }
            else if (zero is not null) zero.ReduceScatter(gradients!);
            else reducer.SumGradients(gradients!);
            // Only the last stage has losses to sum; the exchange along the pipeline below hands them to every stage.
            stats.SumOver(reducer);
            commS += sw.Elapsed.TotalSeconds;
        }
        // The sums are over every replica's micro-batches, or this replica's alone when it has no reducer (dp 1).
        int counted = reducer is null ? accumulation : Options.GlobalBatch / micro;
        ExposeOwnRows(); // ZeRO-3: the update reads and writes this replica's rows only
        if (zero is not null) gradients!.WriteShardMean(counted, zero.Shard);
        else if (expertZero is null) gradients!.WriteMean(counted); // (ep x ZeRO wrote its rows' mean above)
        // The stage's share of the norm: with ep every expert of the stage, exchanged in its group; with ZeRO every
        // replica's rows, exchanged in the stage's group and added row by row (the same bits whatever dp is).
        double sumSq = expertZero?.SumOfSquares(Optimizer) ?? zero?.SumOfSquares(Optimizer) ?? expertParallel?.SumOfSquares(Optimizer) ?? 0;
        if (expertParallel is null && zero is null)
            using (no_grad())
                foreach (var s in Optimizer.Slots)
                {
                    using var n = s.Param.grad!.to_type(ScalarType.Float64).square().sum();
                    sumSq += n.item<double>();
                }
        sw.Restart();
        var own = new List<double> { sumSq, stats.Lm.Value, stats.Mtp.Value, stats.Aux.Value };
        foreach (var l in stats.Loads) own.AddRange(l.Select(x => (double)x));
        var all = links.GatherAlongPipeline([.. own]);
        commS += sw.Elapsed.TotalSeconds;

        double gradNorm = Math.Sqrt(all.Sum(v => v[0]));
        if (Options.ClipNorm > 0 && gradNorm > Options.ClipNorm)
        {
            double scale = Options.ClipNorm / (gradNorm + 1e-6); // AdamW.ClipGradNorm's formula, with the global norm
            ZeroStep.ScaleGradients(Optimizer, scale); // under ZeRO this replica's rows (those its AdamW updates), else all
        }
        // The guard: the norm and the last stage's loss came along the pipeline, so every stage and replica skips together.
        bool skipped = !(double.IsFinite(gradNorm) && double.IsFinite(all[^1][1]));
        BeforeStateChange?.Invoke(StateChange.Update);
        if (!skipped)
        {
            Optimizer.Step(lr);
            // ZeRO: every replica's updated rows to every replica of the stage.
            sw.Restart();
            if (zeroParameters is null) zero?.AllGatherParameters(Optimizer); // (ZeRO-3 gathers each layer when it next runs)
            expertZero?.AllGatherParameters();
            commS += sw.Elapsed.TotalSeconds;
            if (Options.BiasUpdateSpeed > 0)
                for (int l = 0; l < moeLayers.Count; l++) moeLayers[l].gate.UpdateBias(stats.Loads[l], Options.BiasUpdateSpeed);
        }
        zeroParameters?.KeepOwnRowsAndRelease();
        optS = opt.Elapsed.TotalSeconds - (commS - commBefore);
        Step++;

        var last = all[^1];
        int experts = model.Config.NRoutedExperts;
        var pipelineLoads = all.SelectMany(v => Enumerable.Range(0, (v.Length - 4) / Math.Max(1, experts))
            .Select(l => v.Skip(4 + l * experts).Take(experts).Select(x => (long)x).ToArray())).ToList();
        double pipelineAux = all.Sum(v => v[3]);
        double seconds = total.Elapsed.TotalSeconds;
        double tokens = (double)Options.GlobalBatch * Options.SeqLen / Replicas;
        double tps = tokens / seconds;
        // The replica's pipeline spans Pp devices: each stage's device is credited an equal share of the model FLOPs.
        double achieved = tps * flopsPerToken / Stage.Layout.Pp;
        return new StepMetrics(
            Step, last[1] / counted, withMtp ? last[2] / counted : null, pipelineAux > 0 ? pipelineAux / counted : null,
            lr, gradNorm, tps, Peak.Mfu(achieved).Ratio, new StepTimes(dataS, fwdS, bwdS, commS, optS), pipelineLoads)
            { AchievedFlops = achieved, Peak = Peak, Skipped = skipped };
    }

    /// <inheritdoc/>
    public IReadOnlyDictionary<string, Tensor> CheckpointTensors()
    {
        zeroParameters?.MaterializeOwnRows(); // ZeRO-3: full shapes with this replica's rows, the rows its rank writes
        return Stage.StageTensors(Optimizer);
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
        gradients?.Dispose();
        expertZero?.Dispose();
        if (ownsOptimizer) Optimizer.Dispose();
    }
}
