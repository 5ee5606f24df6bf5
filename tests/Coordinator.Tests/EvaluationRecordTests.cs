// A job's evaluation tasks in its spec and its status: the fields are validated naming them, a step report's results JSON
// (lm-evaluation-harness's shape) becomes the status's scores of that checkpoint step, and a resume drops later ones.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class EvaluationRecordTests
{
    const string Results = """
        {"results": {
           "kjv_nextverse": {"alias": "kjv_nextverse", "acc,none": 0.3, "acc_stderr,none": 0.046, "acc_norm,none": 0.28, "acc_norm_stderr,none": 0.045},
           "kjv_heldout": {"alias": "kjv_heldout", "perplexity,none": 41.5, "perplexity_stderr,none": "N/A"}},
         "versions": {"kjv_nextverse": 1.0, "kjv_heldout": 1.0}}
        """;

    [Fact]
    public void EvalTasksEvalLimitAndInitFromAreCheckedNamingTheField()
    {
        Assert.Empty((TestSpecs.Tiny() with { EvalTasks = ["kjv_cloze", "kjv_nextverse"], EvalLimit = 50, InitFrom = "/models/base" }).Validate());
        var read = JobSpecJson.Deserialize("""{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", "the test spec");
        Assert.Equal((0, 0, (string?)null), (read.EvalTasks.Length, read.EvalLimit, read.InitFrom));
        Assert.Equal("evalTasks", Assert.Single((TestSpecs.Tiny() with { EvalTasks = ["../etc/passwd"] }).Validate()).Field);
        Assert.Equal("evalTasks", Assert.Single((TestSpecs.Tiny() with { EvalTasks = ["kjv_cloze", "kjv_cloze"] }).Validate()).Field);
        var pipeline = Assert.Single((TestSpecs.Tiny() with { EvalTasks = ["kjv_cloze"], Parallel = new ParallelPlan { Pp = 2 } }).Validate());
        Assert.Equal("evalTasks", pipeline.Field);
        Assert.Contains("parallel.pp = 1", pipeline.Message);
        Assert.Equal("evalLimit", Assert.Single((TestSpecs.Tiny() with { EvalLimit = -1 }).Validate()).Field);
        Assert.Equal("initFrom", Assert.Single((TestSpecs.Tiny() with { InitFrom = "" }).Validate()).Field);
    }

    [Fact]
    public void TheHarnessResultsOfAStepBecomeItsScores()
    {
        var scores = EvaluationResults.Parse(20, Results);
        Assert.Equal(
        [
            new EvaluationScore(20, "kjv_nextverse", "acc", 0.3, 0.046), new EvaluationScore(20, "kjv_nextverse", "acc_norm", 0.28, 0.045),
            new EvaluationScore(20, "kjv_heldout", "perplexity", 41.5, null),
        ], scores);
        Assert.Contains("step 7", Assert.Throws<InvalidDataException>(() => EvaluationResults.Parse(7, "{\"acc\": 1}")).Message);
        Assert.Contains("step 7", Assert.Throws<InvalidDataException>(() => EvaluationResults.Parse(7, "{not json")).Message);
    }

    [Fact]
    public void TheStatusKeepsEachCheckpointsScoresOnceAndAResumeDropsLaterOnes()
    {
        var state = new TrainingJobGrainState { Spec = TestSpecs.Tiny() with { EvalTasks = ["kjv_nextverse"] } };
        Assert.Null(state.RecordEvaluation(new StepReport { Step = 2, EvalResultsJson = Results }));
        Assert.Null(state.RecordEvaluation(new StepReport { Step = 2, EvalResultsJson = Results })); // the same step again: kept once
        Assert.Null(state.RecordEvaluation(new StepReport { Step = 4, EvalResultsJson = Results.Replace("0.3", "0.5") }));
        Assert.Null(state.RecordEvaluation(new StepReport { Step = 5 })); // a report without an evaluation
        Assert.Contains("step 6", state.RecordEvaluation(new StepReport { Step = 6, EvalResultsJson = "[]" }));
        var status = state.ToStatus("j");
        Assert.Equal([2, 2, 2, 4, 4, 4], status.Evaluations.Select(e => e.Step));
        Assert.Equal(0.5, status.Evaluations.Single(e => e.Step == 4 && e.Metric == "acc").Value);
        state.DropCurvesAfter(3);
        Assert.All(state.ToStatus("j").Evaluations, e => Assert.Equal(2, e.Step));
    }
}
