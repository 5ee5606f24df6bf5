// The AppHost's run once its resources are declared: start them, settle earlier jobs, submit (or resume) the default job,
// follow it, report where everything is, and keep the cluster up until Ctrl+C, SIGTERM or 'quit'.
using System.Security.Cryptography;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.AppHost;

/// <summary>The resources the run talks to (the AppHost declares them in Program.cs).</summary>
public sealed record LocalCluster(Resource Coordinator, Resource DataShards, Resource Checkpoints, Resource Worker, GpuSlots Gpus, Resource? ModelServer = null);

public static class LocalRun
{
    /// <summary>A fresh cluster token per run in {runDir}/cluster.token (owner-only); never printed.</summary>
    public static string NewToken(string runDir)
    {
        Directory.CreateDirectory(runDir);
        var token = Convert.ToHexString(RandomNumberGenerator.GetBytes(32)).ToLowerInvariant();
        var file = TokenFile(runDir);
        File.WriteAllText(file, token);
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        return token;
    }

    static string TokenFile(string runDir) => Path.Combine(runDir, "cluster.token");

    /// <summary>Runs the cluster and its default job; the process exit code.</summary>
    public static async Task<int> RunAsync(DistributedApplicationBuilder builder, LocalCluster cluster, AppHostOptions options, string token)
    {
        using var stop = new CancellationTokenSource();
        using var signals = StopSignals.CancelOnSignal(stop);
        if (StopSignals.SigintIgnored())
            Log.AppHost($"Ctrl+C does not reach this AppHost: it was started with SIGINT ignored (it ran as a background command of a script); 'quit' or kill -TERM {Environment.ProcessId} stops it");
        await using var app = builder.Build();
        var endpoints = new EndpointsFile(Path.Combine(options.RunDir, "endpoints.json"));
        app.ChildExited += (instance, _) => { endpoints.Remove(instance); cluster.Gpus.Release(instance); };
        using var coordinator = new CoordinatorClient(new Uri(cluster.Coordinator.GetEndpoint("http").Url), token);
        // The services run in the AppHost's own configuration: see docs/decisions.md, "The AppHost starts the services' builds of its own configuration".
        Log.AppHost($"starting the {builder.Configuration} builds of the services{(builder.Configuration == "Debug" ? " (dotnet run -c Release --project AppHost starts Release ones)" : "")}");
        try
        {
            await app.StartAsync(stop.Token);
            foreach (var r in new[] { cluster.Coordinator, cluster.DataShards, cluster.Checkpoints }) endpoints.Add(r.Name, r); // one instance each
            Log.AppHost($"endpoints of every instance: {endpoints.Path}");
            Log.AppHost($"status page (while it runs): {coordinator.BaseAddress}status");

            if (options.StudyFile is { } studyFile)
            {
                // The corpus is packed at the base job's sequence length, so the trials' samples are whole.
                var corpus = await DefaultJob.PrepareCorpusAsync(options with { SeqLen = StudyRun.SeqLenOf(studyFile) ?? options.SeqLen }, cluster.DataShards, Path.Combine(builder.RepositoryRoot, "data", "corpus", "kjv.txt.gz"), token, stop.Token);
                _ = ConsoleCommands.AcceptAsync(app, cluster.Worker, stop);
                var study = await StudyRun.RunAsync(coordinator, studyFile, corpus, stop.Token);
                if (options.ExitWhenDone) return study.State == StudyState.Completed ? 0 : 1;
                Log.AppHost("the cluster stays up; Ctrl+C (or 'quit') stops it");
                await Task.Delay(Timeout.Infinite, stop.Token);
                return 0;
            }
            var jobId = await EarlierJobs.HandleAsync(coordinator, options.Fresh, stop.Token);
            if (jobId is null)
            {
                var dataset = await DefaultJob.PrepareCorpusAsync(options, cluster.DataShards, Path.Combine(builder.RepositoryRoot, "data", "corpus", "kjv.txt.gz"), token, stop.Token);
                if (options.EvaluationNote is { } evaluation) Log.AppHost(evaluation);
                jobId = await DefaultJob.SubmitAsync(coordinator, options, dataset, stop.Token);
            }
            _ = ConsoleCommands.AcceptAsync(app, cluster.Worker, stop);
            var follower = new JobFollower(coordinator, endpoints);
            var final = await follower.FollowAsync(jobId, stop.Token);
            var modelPlace = final.State == JobState.Completed ? await WaitForModelAsync(coordinator, jobId, stop.Token) : null;
            if (modelPlace is not null && cluster.ModelServer is { } server) await StartModelServerAsync(app, cluster, server, modelPlace, options, endpoints, stop.Token);
            Log.AppHost($"job {jobId} ended: {final.State}");
            Log.AppHost($"REST API: {coordinator.BaseAddress}jobs   (writes need 'Authorization: Bearer <token>' with the token in {TokenFile(options.RunDir)})");
            Log.AppHost($"status page: {coordinator.BaseAddress}status");
            await follower.RefreshWorkersAsync(stop.Token);
            foreach (var i in endpoints.Snapshot().Where(i => i.Endpoints.ContainsKey("http")))
                Log.AppHost($"metrics: {i.Endpoints["http"]}/metrics   ({i.Name})");
            if (options.ExitWhenDone) return final.State == JobState.Completed ? 0 : 1;
            Log.AppHost("the cluster stays up; Ctrl+C (or 'quit') stops it");
            await Task.Delay(Timeout.Infinite, stop.Token);
            return 0;
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            Log.AppHost($"stopping; a job not yet finished stays in {options.RunDir}: the next run resumes it (--fresh stops it instead)");
            return 0;
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException or HttpRequestException or Grpc.Core.RpcException)
        {
            Log.AppHost($"failed: {e.Message}");
            return 1;
        }
    }

    /// <summary>
    /// Rank 0 evaluates, samples and puts the model into the store after the last step, and its worker tells the
    /// Coordinator (GET /workers, SavedModel, its place in the store): wait for that before reporting, bounded.
    /// </summary>
    static async Task<string?> WaitForModelAsync(CoordinatorClient coordinator, string jobId, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(3);
        while (DateTime.UtcNow < deadline)
        {
            var saved = (await coordinator.WorkersAsync(ct)).FirstOrDefault(w => w.SavedModel?.JobId == jobId);
            if (saved is { SavedModel: { } model })
            {
                Log.AppHost($"model of job {jobId} (step {model.Step}) put by {saved.WorkerId} into the checkpoint store as {model.Path}");
                return model.Path;
            }
            await Task.Delay(500, ct);
        }
        Log.AppHost($"no worker reported the model of job {jobId} within 3 minutes (see the workers' log lines above)");
        return null;
    }

    /// <summary>
    /// Serves the job's model from the store (docs/serving.md: the server downloads the export, hash-checked, into its
    /// cache) and prints a request to paste; the token is read from its file, never printed.
    /// </summary>
    static async Task StartModelServerAsync(DistributedApplication app, LocalCluster cluster, Resource server, string place, AppHostOptions options, EndpointsFile endpoints, CancellationToken ct)
    {
        server.WithEnvironment("Serving__Models__0__Store", place);
        server.WithEnvironment("Serving__Store", cluster.Checkpoints.GetEndpoint("grpc").Url);
        server.WithEnvironment("Serving__ModelCache", Path.Combine(options.RunDir, "model-cache"));
        var instance = app.Start(server, 0);
        await app.WaitReadyAsync(server, ct);
        endpoints.Add(instance, server);
        var url = server.GetEndpoint("http").Url;
        Log.AppHost($"model server: {url}/v1 (OpenAI API, model \"default\", {place} from the checkpoint store); try:");
        Log.AppHost($"  curl {url}/v1/completions -H \"Authorization: Bearer $(cat {TokenFile(options.RunDir)})\" -H 'Content-Type: application/json' " +
                    "-d '{\"model\": \"default\", \"prompt\": \"In the beginning\", \"max_tokens\": 32, \"temperature\": 0}'");
    }
}
