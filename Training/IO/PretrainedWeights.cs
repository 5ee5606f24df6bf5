// A Hugging Face folder's weights as a model takes them (ours, or transformers' with FP8 blocks dequantized): what
// HfModelFolder.Load reads and what a job's initFrom copies into its freshly built model. Not a checkpoint loader.
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

public static class PretrainedWeights
{
    /// <summary>Every tensor of the folder under its HF name, FP8 weights already float32 (their scales dropped).</summary>
    public static Dictionary<string, Tensor> Load(string dir)
    {
        var weights = HfWeights.Load(dir);
        try
        {
            Fp8BlockDequant.Apply(weights, dir);
            return weights;
        }
        catch
        {
            foreach (var t in weights.Values) t.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Copies the folder's weights into <paramref name="model"/> (initFrom): every tensor of the model must be there with
    /// its shape (MTP layers may be missing: they keep their initialization), or the error names the folder and tensor.
    /// </summary>
    public static void LoadInto(DeepSeekForCausalLM model, string dir)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"initFrom: model folder '{dir}' does not exist.");
        var weights = Load(dir);
        try { model.LoadHfStateDict(weights, dir); }
        finally { foreach (var t in weights.Values) t.Dispose(); }
    }
}
