// The routed experts a rank holds, registered under their global index, so names and checkpoints are the same whatever ep is.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// Experts [<see cref="First"/>, First + Count) of a MoE layer. Unlike a ModuleList (children named 0..n-1), children are
/// named by their global expert index, so an expert-parallel rank's parameter names ("mlp.experts.5.up_proj.weight"),
/// optimizer slots and checkpoint tensors are those of the whole model. The indexer takes the local index.
/// </summary>
public sealed class ExpertList : nn.Module, IReadOnlyList<SwiGluMlp>
{
    List<SwiGluMlp> list;
    bool registered;

    public int First { get; private set; }

    public ExpertList(int first, IEnumerable<SwiGluMlp> experts) : base(nameof(ExpertList))
    {
        if (first < 0) throw new ArgumentOutOfRangeException(nameof(first), first, "the first expert index must be >= 0");
        First = first;
        list = [.. experts];
    }

    protected override void RegisterComponents()
    {
        if (registered) return;
        for (int i = 0; i < list.Count; i++) register_module($"{First + i}", list[i]);
        registered = true;
    }

    /// <summary>
    /// Keeps experts [<paramref name="first"/>, first + <paramref name="count"/>) (global indices) and disposes the others.
    /// The list stays where it is registered in its layer, so the parameter order is the whole model's minus the others.
    /// </summary>
    public void Keep(int first, int count)
    {
        if (first < First || count < 1 || first + count > First + list.Count)
            throw new ArgumentOutOfRangeException(nameof(count), $"experts [{first}, {first + count}) are not within the held [{First}, {First + list.Count})");
        var kept = list.GetRange(first - First, count);
        for (int i = 0; i < list.Count; i++)
        {
            register_module($"{First + i}", null!); // a null module unregisters the name
            if (!kept.Contains(list[i])) list[i].Dispose();
        }
        list = kept;
        First = first;
        for (int i = 0; i < list.Count; i++) register_module($"{First + i}", list[i]);
    }

    public SwiGluMlp this[int index] => list[index];
    public int Count => list.Count;
    public IEnumerator<SwiGluMlp> GetEnumerator() => list.GetEnumerator();
    System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();
}
