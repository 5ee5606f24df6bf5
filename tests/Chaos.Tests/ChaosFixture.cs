// One cluster for all the scenarios of the class: the services start once, the corpus is prepared once, and the
// undisturbed reference run (same seed, global batch and steps as every scenario) trains once. Each scenario brings
// its own workers and job and stops its workers at the end, so the next one starts from an idle cluster.
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace DeepSeekCluster.Chaos.Tests;

public sealed class ChaosFixture : IAsyncLifetime
{
    public const int SeqLen = 32, VocabSize = 512;
    public ChaosCluster Cluster { get; private set; } = null!;
    public string DatasetId { get; private set; } = "";
    public ModelWeights Reference { get; private set; } = null!;
    public JobView ReferenceJob { get; private set; } = null!;
    public string RunDir { get; } = Directory.CreateTempSubdirectory("chaos-").FullName;
    /// <summary>Why no network namespace could be made here (the network scenario fails with it), or null.</summary>
    public string? NamespaceUnavailable { get; private set; }
    public ChaosJob Job(int minWorkers, int maxWorkers) => new() { SeqLen = SeqLen, MinWorkers = minWorkers, MaxWorkers = maxWorkers };

    readonly IMessageSink sink;
    public ITestOutputHelper? Output { get; set; }

    public ChaosFixture(IMessageSink sink) => this.sink = sink;

    void Log(string message)
    {
        var line = $"{DateTime.UtcNow:HH:mm:ss.fff} {message}";
        try { Output?.WriteLine(line); } catch (InvalidOperationException) { } // no test running right now
        sink.OnMessage(new DiagnosticMessage(line));
    }

    ClusterTestLock? clusterLock;

    public async Task InitializeAsync()
    {
        clusterLock = await ClusterTestLock.AcquireAsync("chaos scenarios");
        NamespaceUnavailable = NetworkNamespace.Unavailable();
        Cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions
        {
            RunDir = RunDir, NetworkNamespace = NamespaceUnavailable is null, Log = Log,
        }, CancellationToken.None);
        DatasetId = await Cluster.PrepareCorpusAsync(SeqLen, VocabSize, CancellationToken.None);
        // The reference: two workers from start to end, no fault.
        var job = Job(2, 2) with { Name = "chaos-reference" };
        try
        {
            var workers = new[] { Cluster.AddWorker(), Cluster.AddWorker() };
            await Cluster.WaitForIdleWorkersAsync(workers, TimeSpan.FromMinutes(5), CancellationToken.None);
            await Cluster.SubmitAsync(job, DatasetId, CancellationToken.None);
            var (view, model) = await Cluster.WaitForCompletionAsync(job.Name, TimeSpan.FromMinutes(8), CancellationToken.None);
            ReferenceJob = view;
            Reference = ModelWeights.Read(model);
            Log($"reference run done: {view.Describe()}");
        }
        finally
        {
            try { await Cluster.StopJobAsync(job.Name, CancellationToken.None); } catch (HttpRequestException) { }
            await Cluster.StopWorkersAsync();
        }
    }

    public async Task DisposeAsync()
    {
        try
        {
            if (Cluster is not null) await Cluster.DisposeAsync();
            try { Directory.Delete(RunDir, true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
        finally { clusterLock?.Dispose(); }
    }
}
