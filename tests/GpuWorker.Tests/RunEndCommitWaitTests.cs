// Rank 0's wait, at the end of a sharded job, for the final checkpoint's commit: a store that cannot be reached is named
// in the log and the wait ends with the run, rather than an exception ending the run's end (and its model) early.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests;

public class RunEndCommitWaitTests
{
    [Fact]
    public void AnUnreachableStoreIsNamedAndTheWaitEndsWithTheRun()
    {
        int closed = FreePort.Next(); // nothing listens there: every call fails with Unavailable
        using var channel = Grpc.Net.Client.GrpcChannel.ForAddress($"http://127.0.0.1:{closed}");
        var store = new GrpcCheckpointStore(new Contracts.Checkpoints.CheckpointStore.CheckpointStoreClient(channel), $"http://127.0.0.1:{closed}", "job-a", Path.GetTempPath());
        var log = new StringWriter();
        using var cancel = new RunCancellation();
        var run = new RunContext(new Assignment { JobId = "job-a", Rank = 0, Generation = 1 }, new WorkerSettings
        {
            Coordinator = new Uri("http://127.0.0.1:1"), DataShards = new Uri("http://127.0.0.1:1"), Checkpoints = new Uri($"http://127.0.0.1:{closed}"),
            Token = "t", WorkerId = "w",
        },
                                 _ => { }, log, null, cancel, new ReplicaHolder());
        cancel.Cancel(TimeSpan.Zero); // the job's Stop came: one look at the store, then the end

        bool committed = RunEnd.WaitForCommit(run, store, 12, cancel.Boundary);

        Assert.False(committed);
        string output = log.ToString();
        Assert.Contains("could not list the committed checkpoints", output);
        Assert.Contains($"127.0.0.1:{closed}", output);
        Assert.Contains("the final checkpoint (step 12) is not committed and the run ended", output);
    }
}
