// What the cluster tests do with a job over the Coordinator's REST API: submit it, wait for its completion (and, where
// the worker uploads the final model, for that too), and read its losses in step order.
using System.Net;
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

internal static class ClusterJobs
{
    public static async Task Submit(HttpClient http, JobSpec spec)
    {
        var submitted = await http.PostAsync("/jobs", new StringContent(JobSpecJson.Serialize(spec), System.Text.Encoding.UTF8, "application/json"));
        Assert.True(submitted.StatusCode == HttpStatusCode.Created, $"{spec.Name}: {await submitted.Content.ReadAsStringAsync()}");
    }

    /// <summary>Waits until <paramref name="job"/> completes (a failure fails the test) with step <paramref name="steps"/> committed.</summary>
    public static async Task<JobStatus> Completion(HttpClient http, string job, long steps, StringWriter log)
    {
        JobStatus? status = null;
        await InProcessCoordinator.Until(async () =>
        {
            status = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{job}", JobSpecJson.Options))!;
            Assert.NotEqual(JobState.Failed, status.State);
            return status.State == JobState.Completed;
        }, $"job {job} completes", log);
        Assert.Equal(steps, status!.Committed.Max(c => c.Step));
        return status;
    }

    /// <summary>
    /// Submits <paramref name="spec"/> and waits for its completion, the worker's upload of the final model and the final
    /// validation; step <paramref name="steps"/> is the one committed checkpoint (the spec checkpoints only at the end).
    /// </summary>
    public static async Task<JobStatus> RunToCompletion(HttpClient http, JobSpec spec, long steps, StringWriter log)
    {
        await Submit(http, spec);
        JobStatus? status = null;
        await InProcessCoordinator.Until(async () =>
        {
            status = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{spec.Name}", JobSpecJson.Options))!;
            Assert.NotEqual(JobState.Failed, status.State);
            // The end's validation and the model's upload come after the completion: wait for the upload too.
            return status.State == JobState.Completed && log.ToString().Contains($"model saved to the checkpoint store as exports/{spec.Name}/");
        }, $"job {spec.Name} completes", log);
        await InProcessCoordinator.Until(async () =>
        {
            status = (await http.GetFromJsonAsync<JobStatus>($"/jobs/{spec.Name}", JobSpecJson.Options))!;
            return status.ValidationLoss.Any(v => v.Step == steps);
        }, $"the final validation of {spec.Name}", log);
        Assert.Equal([steps], status!.Committed.Select(c => c.Step));
        return status;
    }

    public static IEnumerable<double> Losses(JobStatus s) => s.Loss.OrderBy(p => p.Step).Select(p => p.Loss);
}
