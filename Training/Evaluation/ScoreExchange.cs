// Gathers the example scores of every rank's share on every rank, through the job's collective: one all-reduce of a
// (examples, 7) float64 table in which each rank fills only its own rows. Sums with zeros are exact, so the gathered
// scores are bit for bit those each rank computed.
using DeepSeekCluster.Training.Collectives;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Harness;

public static class ScoreExchange
{
    const int Columns = 7; // filled, log-prob, correct, correct (normalised), tokens, words, bytes

    public static List<ExampleScore> AllGather(EvalPlan plan, IReadOnlyList<ExampleScore> mine, ICollective collective)
    {
        var index = new Dictionary<(int, int), int>();
        for (int i = 0; i < plan.Examples.Count; i++) index[(plan.Examples[i].Task, plan.Examples[i].Example)] = i;
        var table = new double[plan.Examples.Count * Columns];
        foreach (var s in mine)
        {
            int row = index[(s.Task, s.Example)] * Columns;
            (table[row], table[row + 1], table[row + 2], table[row + 3]) = (1, s.LogProb, s.Correct ? 1 : 0, s.CorrectNorm ? 1 : 0);
            (table[row + 4], table[row + 5], table[row + 6]) = (s.Tokens, s.Words, s.Bytes);
        }
        using var t = tensor(table, [plan.Examples.Count, Columns], ScalarType.Float64);
        collective.AllReduce(t, ReduceOp.Sum);
        var all = t.data<double>().ToArray();
        var scores = new List<ExampleScore>(plan.Examples.Count);
        for (int i = 0; i < plan.Examples.Count; i++)
        {
            int row = i * Columns;
            if (all[row] != 1)
                throw new InvalidOperationException($"example {i} of the evaluation was scored by {all[row]} ranks, not one: the ranks' shares do not partition the plan");
            var ex = plan.Examples[i];
            scores.Add(new ExampleScore(ex.Task, ex.Example, all[row + 1], all[row + 2] == 1, all[row + 3] == 1, (long)all[row + 4], (long)all[row + 5], (long)all[row + 6]));
        }
        return scores;
    }
}
