// A pipeline replica's validation loss: forwards only, the hidden states down the links, the loss from the last stage.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Pipeline;

public sealed partial class PipelineTrainer
{
    /// <summary>
    /// <see cref="ITrainer.Evaluate"/> of the replica's pipeline: forwards only over the micro-batches
    /// <see cref="Evaluation.Batches"/> names, the hidden states sent down the pipeline, the loss computed on the last
    /// stage and returned by every stage. Every stage of the replica must call it together, with sources of one length.
    /// </summary>
    /// <remarks>Under ZeRO-3 every replica of the stage evaluates too: each layer gathers its parameters from all of them.</remarks>
    public double Evaluate(ISampleSource validation, int batches)
    {
        if (zeroParameters is null) return EvaluatePipeline(validation, batches);
        zeroParameters.KeepOwnRowsAndRelease();
        zeroParameters.GatherRest();
        try { return EvaluatePipeline(validation, batches); }
        finally { zeroParameters.ReleaseAll(); }
    }

    double EvaluatePipeline(ISampleSource validation, int batches)
    {
        using var hold = FinalizerHold.Enter();
        var model = Stage.Model;
        model.eval();
        try
        {
            using var noGrad = no_grad();
            var dtype = model.model.embed_tokens.weight!.dtype;
            double sum = 0;
            int done = 0;
            foreach (var range in Evaluation.Batches(validation.SampleCount, Options.MicroBatch, batches))
            {
                using var scope = NewDisposeScope();
                long[] shape = [range.Count, Options.SeqLen, model.Config.HiddenSize];
                Tensor? batch = Stage.IsFirst || Stage.IsLast ? validation.Fetch(range.Start, range.Count).to(Device) : null;
                var input = Stage.IsFirst ? null : links.Previous!.Receive(shape, dtype, Device);
                var output = Stage.Forward(batch?.narrow(1, 0, Options.SeqLen), input, null, Stage.IsLast ? batch : null, withMtp: false);
                if (Stage.IsLast) sum += Trainer.ValueOf(output.LmLoss!);
                else links.Next!.Send(output.Hidden_BTD);
                done++;
            }
            var last = links.GatherAlongPipeline([sum, done])[^1];
            return last[1] == 0 ? double.NaN : last[0] / last[1];
        }
        finally { model.train(); }
    }
}
