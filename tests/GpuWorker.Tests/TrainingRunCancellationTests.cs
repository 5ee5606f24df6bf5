// A training run cancelled while it waits on a service (the DataShardService manifest here) ends as cancelled: the
// cancel surfaces from gRPC as RpcException(Cancelled), and reporting that as a failure failed the whole job (found by
// the soak: a worker asked to leave, or moved to a new generation, while its run was still setting up).
using System.Net;
using System.Net.Sockets;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;
using JobSpec = DeepSeekCluster.Contracts.Grains.JobSpec;
using JobSpecJson = DeepSeekCluster.Contracts.Grains.JobSpecJson;

namespace DeepSeekCluster.GpuWorker.Tests;

public class TrainingRunCancellationTests
{
    [Fact]
    public async Task ARunCancelledInAServiceCallEndsCancelledWithoutReportingAFailure()
    {
        // A "service" that accepts connections and never answers: the run's first call (GetManifest) blocks in it.
        var silent = new TcpListener(IPAddress.Loopback, 0);
        silent.Start();
        var accepted = new List<Socket>();
        var called = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var accepting = Task.Run(async () =>
        {
            try { while (true) { var s = await silent.AcceptSocketAsync(); lock (accepted) accepted.Add(s); called.TrySetResult(); } }
            catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        });
        var address = new Uri($"http://127.0.0.1:{((IPEndPoint)silent.LocalEndpoint).Port}");
        try
        {
            var spec = new JobSpec
            {
                Name = "cancelled", ModelPreset = "tiny", Dataset = "ds-none", GlobalBatch = 4, MicroBatch = 2, SeqLen = 16, Steps = 5,
            };
            var assignment = new Assignment
            {
                JobId = "cancelled", Generation = 3, Rank = 0, World = 1, DpRank = 0, DpSize = 1, PpSize = 1,
                JobSpecJson = JobSpecJson.Serialize(spec), Peers = { [0] = "127.0.0.1:1" },
                LinkKey = Google.Protobuf.ByteString.CopyFrom(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32)),
            };
            var settings = new WorkerSettings
            {
                Coordinator = address, DataShards = address, Checkpoints = address, Token = "t", WorkerId = "w", Device = "cpu",
                OutputDir = Path.Combine(Path.GetTempPath(), $"run-cancel-{Guid.NewGuid():N}"),
            };
            var sent = new List<WorkerMessage>();
            var log = new StringWriter();
            var run = new TrainingRun(assignment, settings, 0, m => { lock (sent) sent.Add(m); }, new WorkerProgress(), log);
            var running = Task.Factory.StartNew(run.Run, TaskCreationOptions.LongRunning);

            // Cancel once the call is in flight (the silent service has its connection), as a new Assignment or a Leave does.
            var first = await Task.WhenAny(called.Task, running, Task.Delay(TimeSpan.FromSeconds(60))); // the third: the deadline
            Assert.False(first == running, $"the run ended before its first call: {log}");
            Assert.True(first == called.Task, "the run never called the data service within 60 s");
            run.Cancel();
            await running.WaitAsync(TimeSpan.FromSeconds(60));

            lock (sent) Assert.DoesNotContain(sent, m => m.KindCase == WorkerMessage.KindOneofCase.Leaving);
            Assert.Contains("run cancelled", log.ToString());
            Assert.DoesNotContain("training failed", log.ToString());
        }
        finally
        {
            silent.Stop();
            lock (accepted) foreach (var s in accepted) s.Dispose();
            await accepting;
        }
    }
}
