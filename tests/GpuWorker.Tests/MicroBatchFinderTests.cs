// The batch-size finder (microBatch unset): the largest micro-batch whose MemoryPlanner prediction fits the budget with
// headroom, checked against the planner's prediction of every candidate; and a job that leaves microBatch unset trains
// with what it found.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class MicroBatchFinderTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    static readonly DeepSeekConfig Tiny = DeepSeekConfig.Tiny(512);
    static readonly ParallelLayout Alone = ParallelLayout.Even(1, 1, Tiny.NumHiddenLayers).WithShards(1, 0, Tiny.NRoutedExperts);
    static readonly MemoryInputs Fp32 = new("fp32", "none", 1, 256);

    /// <summary>The planner's bytes for rank 0 of one replica at micro-batch <paramref name="m"/> (the finder's candidates, computed here on their own).</summary>
    static long Predicted(int m, int share = 16) => MemoryPlanner.Predict(Tiny, Alone, 0, Fp32 with { MicroBatch = m, MicroBatchesPerStep = share / m }).Total;

    [Fact]
    public void TheFinderPicksTheLargestMicroBatchWhosePredictionFitsTheBudgetWithHeadroom()
    {
        // The activations grow with the micro-batch: each candidate costs more than the one before.
        int[] divisors = [1, 2, 4, 8, 16];
        Assert.True(divisors.Zip(divisors.Skip(1)).All(p => Predicted(p.First) < Predicted(p.Second)));

        // A budget whose 90% lies between the predictions of 4 and 8: 4 is chosen, 8 stopped the growth, 16 was never tried.
        long budget = (long)((Predicted(4) + Predicted(8)) / 2 / MicroBatchFinder.DefaultHeadroom);
        var found = MicroBatchFinder.Find(Tiny, Alone, Fp32, replicaShare: 16, budget);
        Assert.Equal((4, Predicted(4), (long)(budget * 0.9)), (found.MicroBatch, found.PredictedBytes, found.LimitBytes));
        Assert.Equal([(1, Predicted(1)), (2, Predicted(2)), (4, Predicted(4)), (8, Predicted(8))], found.Tried);
        Assert.Equal((8, Predicted(8)), found.Stopper);
        Assert.StartsWith("micro-batch 4: ", found.ToString());

        // The headroom is kept: a budget that holds 8 exactly, but not with a tenth to spare, still gives 4.
        Assert.Equal(4, MicroBatchFinder.Find(Tiny, Alone, Fp32, 16, Predicted(8)).MicroBatch);
        Assert.Equal(8, MicroBatchFinder.Find(Tiny, Alone, Fp32, 16, (long)Math.Ceiling(Predicted(8) / 0.9) + 1).MicroBatch);
        // Only divisors of the share: with 12 sequences per replica, 8 is no candidate (6 is).
        Assert.Equal([1, 2, 3, 4, 6], MicroBatchFinder.Find(Tiny, Alone, Fp32, 12, Predicted(6, 12) * 2).Tried.Select(t => t.MicroBatch).Take(5));
        // Everything fits: the whole share in one micro-batch, and nothing stopped it.
        var all = MicroBatchFinder.Find(Tiny, Alone, Fp32, 16, 1L << 40);
        Assert.Equal((16, (int?)null), (all.MicroBatch, all.Stopper?.MicroBatch));
    }

    [Fact]
    public void NotEvenOneSequenceFittingIsRefusedNamingTheBytes()
    {
        var e = Assert.Throws<PlanDoesNotFitException>(() => MicroBatchFinder.Find(Tiny, Alone, Fp32, 16, Predicted(1)));
        Assert.Contains($"one sequence of 256 tokens is predicted at {RankMemory.Gib(Predicted(1))}", e.Message);
        Assert.Contains("90%", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => MicroBatchFinder.Find(Tiny, Alone, Fp32, 0, 1L << 30));
    }

    [Fact]
    public void MicroBatchZeroIsValidAndANegativeOneIsRefusedNamingTheField()
    {
        var spec = new JobSpec { ModelPreset = "tiny", Dataset = "d", GlobalBatch = 8, MicroBatch = 0, SeqLen = 16, Steps = 2, MaxWorkers = 2 };
        Assert.Empty(spec.Validate());
        Assert.Equal(2, spec.ChooseDataParallel(2)); // any dp dividing the global batch
        var problem = Assert.Single((spec with { MicroBatch = -1 }).Validate());
        Assert.Equal("microBatch", problem.Field);
        Assert.Contains("or 0 (absent) for the largest that fits", problem.Message);
    }

    [Fact]
    public async Task AJobThatLeavesMicroBatchUnsetTrainsWithTheMicroBatchTheFinderPicked()
    {
        var data = fixture.Host;
        var spec = new JobSpec
        {
            Name = "auto-micro", ModelPreset = "tiny", Dataset = data.DatasetId, GlobalBatch = 8, SeqLen = DataShardsHost.SeqLen, Steps = 1,
            Schedule = new() { Kind = "constant", WarmupSteps = 1 },
        };
        Assert.Empty(spec.Validate());
        int port = FreePort.Next();
        var assignment = new Assignment
        {
            JobId = spec.Name!, Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
            JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
            LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
        };
        // The budget the finder should cut at 2 (of 1, 2, 4, 8), from the planner's prediction for the job's own model.
        var manifest = new Contracts.DataShards.DataShards.DataShardsClient(Grpc.Net.Client.GrpcChannel.ForAddress(data.Address))
            .GetManifest(new Contracts.DataShards.GetManifestRequest { DatasetId = data.DatasetId });
        var (config, _) = JobPlan.Map(spec, manifest.VocabSize, 0);
        var inputs = new MemoryInputs("fp32", "none", 1, DataShardsHost.SeqLen);
        long Bytes(int m) => MemoryPlanner.Predict(config, Alone, 0, inputs with { MicroBatch = m, MicroBatchesPerStep = 8 / m }).Total;
        long budget = (long)((Bytes(2) + Bytes(4)) / 2 / MicroBatchFinder.DefaultHeadroom);

        await using var store = await StoreHost.StartAsync();
        string output = Directory.CreateTempSubdirectory("run-auto-micro-").FullName;
        var settings = new WorkerSettings
        {
            Coordinator = data.Address, DataShards = data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
            OutputDir = output, MemoryBudgetBytes = budget,
        };
        var sent = new List<WorkerMessage>();
        var log = new StringWriter();
        var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
        await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));
        string text = log.ToString();
        Assert.Contains("microBatch unset: the batch-size finder chose micro-batch 2:", text);
        Assert.Contains("global batch 8 = 1 x 2 x 4 micro-batches", text); // the trainer runs with it
        lock (sent) Assert.Single(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Step && m.Step.SampleCount == 8);
        Directory.Delete(output, recursive: true);
    }
}
