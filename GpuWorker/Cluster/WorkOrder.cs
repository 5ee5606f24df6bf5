// What a worker's work for the Coordinator outside any generation (an export, an evaluation share) shares: a scratch
// folder removed whatever happens, and every failure turned into the report's error text, since the Coordinator holds
// the worker until it hears one.
namespace DeepSeekCluster.GpuWorker.Cluster;

static class WorkOrder
{
    /// <summary>Runs <paramref name="body"/> in a fresh scratch folder; returns null, or the failure as the report's error.</summary>
    /// <param name="what">Names the work in log lines, e.g. "export of step 5 of job j as hf".</param>
    public static async Task<string?> InScratchAsync(string prefix, string what, TextWriter log, Func<string, Task> body)
    {
        string scratch = Directory.CreateTempSubdirectory(prefix).FullName;
        try
        {
            await body(scratch);
            return null;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            Log(log, $"{what} failed: {e}");
            return e is Grpc.Core.RpcException r ? $"{r.StatusCode}: {r.Status.Detail}" : e.Message;
        }
        finally
        {
            try { Directory.Delete(scratch, recursive: true); }
            catch (IOException e) { Log(log, $"could not delete the scratch folder of the {what} ({scratch}): {e.Message}"); }
        }
    }

    public static void Log(TextWriter log, string message) { lock (log) log.WriteLine(message); }
}
