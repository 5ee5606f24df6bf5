// One real cluster at a time across test projects. `dotnet test` runs the test projects in parallel, and two clusters of
// real processes on a 2-core CI machine starve each other past their heartbeat and collective timeouts, which would turn
// a fault-tolerance test into a test of the machine's load. Suites that start a cluster hold this lock while it runs.
namespace DeepSeekCluster.Tests.Shared;

internal sealed class ClusterTestLock : IDisposable
{
    static readonly string LockPath = Path.Combine(Path.GetTempPath(), "deepseekcluster-cluster-tests.lock");
    readonly FileStream file;

    ClusterTestLock(FileStream file) => this.file = file;

    /// <summary>Waits until no other suite runs a cluster (an exclusive lock on a file in the temp folder).</summary>
    public static async Task<ClusterTestLock> AcquireAsync(string who, TimeSpan? deadline = null)
    {
        var until = DateTime.UtcNow + (deadline ?? TimeSpan.FromMinutes(45));
        while (true)
        {
            try { return new ClusterTestLock(new FileStream(LockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None)); }
            catch (IOException) when (DateTime.UtcNow < until)
            {
                await Task.Delay(TimeSpan.FromMilliseconds(500)); // another suite's cluster is running: wait for its lock
            }
            catch (IOException e)
            {
                throw new TimeoutException($"{who}: another test suite held the cluster lock {LockPath} for longer than the deadline", e);
            }
        }
    }

    public void Dispose() => file.Dispose();
}
