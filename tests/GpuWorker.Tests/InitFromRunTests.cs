// initFrom in a cluster run: the generation's model starts from the Hugging Face folder's weights, so its first step's
// loss is the folder model's loss on that step's batch, computed here independently from the same samples.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;
using TrainingEvaluation = DeepSeekCluster.Training.Engine.Evaluation;

namespace DeepSeekCluster.GpuWorker.Tests;

public class InitFromRunTests(DataShardsHostFixture fixture) : IClassFixture<DataShardsHostFixture>
{
    DataShardsHost Data => fixture.Host;

    [Fact]
    public async Task AClusterRunStartedFromAModelFolderBeginsAtThatModelsLossOnItsFirstBatch()
    {
        const int seed = 515, globalBatch = 2;
        await using var store = await StoreHost.StartAsync();
        var scratch = Directory.CreateTempSubdirectory("init-from-run-").FullName;
        try
        {
            var spec = new JobSpec
            {
                Name = "pretrained", ModelPreset = "tiny", Dataset = Data.DatasetId, GlobalBatch = globalBatch, MicroBatch = globalBatch,
                SeqLen = DataShardsHost.SeqLen, Steps = 1, Seed = seed, Schedule = new() { WarmupSteps = 1 },
                InitFrom = Path.Combine(scratch, "pretrained"),
            };
            int port = FreePort.Next();
            var assignment = new Assignment
            {
                JobId = "pretrained", Generation = 1, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
                JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = $"127.0.0.1:{port}" },
                LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
            };
            var manifest = Data.Client.GetManifest(new GetManifestRequest { DatasetId = Data.DatasetId });
            var tokenizerReply = Data.Client.GetTokenizer(new GetManifestRequest { DatasetId = Data.DatasetId });

            // The folder: the job's model shape, initialized from another seed, its head scaled so that its loss is far
            // from any freshly initialized model's (a run that ignored initFrom could not land on it by chance).
            using var pretrained = DeepSeekForCausalLM.FromSeed(JobPlan.For(assignment, spec, manifest, tokenizerReply).Config, seed + 1);
            using (no_grad()) pretrained.lm_head.weight!.mul_(4);
            HfModelFolder.Save(spec.InitFrom, pretrained, BpeTokenizer.FromJson(tokenizerReply.TokenizerJson, "the test dataset"));

            // Its loss on the run's first batch: global positions [0, 2) of the seed's permutation of the train split.
            double expected;
            using (var firstBatch = RemoteSampleSource.For(manifest, Data.Client, Data.DatasetId, seed, DataShardsHost.SeqLen, globalBatch, CancellationToken.None))
                expected = TrainingEvaluation.LmLoss(pretrained, firstBatch, globalBatch, CPU, batches: 1);

            var sent = new List<WorkerMessage>();
            var log = new StringWriter();
            var settings = new WorkerSettings
            {
                Coordinator = Data.Address, DataShards = Data.Address, Checkpoints = new Uri(store.Address), Token = "t", WorkerId = "w", Device = "cpu",
                OutputDir = Path.Combine(scratch, "runs"),
            };
            var run = new TrainingRun(assignment, settings, port, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
            await Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromMinutes(5));

            StepReport first;
            lock (sent) first = sent.First(m => m.KindCase == WorkerMessage.KindOneofCase.Step).Step;
            Assert.Contains("initFrom: the model starts from the weights of", log.ToString());
            Assert.Equal((1L, 0L, globalBatch), (first.Step, first.SampleStart, first.SampleCount));
            // The step's loss is its language-model loss before the update (MTP and aux losses are reported apart); the
            // training forward and the evaluation forward differ only in reduction order.
            Assert.True(Math.Abs(first.Loss - expected) < 1e-4 * expected,
                $"the first step's loss {first.Loss} is not the pretrained folder's {expected} on the same batch; run log:\n{log}");
        }
        finally { Directory.Delete(scratch, recursive: true); }
    }
}
