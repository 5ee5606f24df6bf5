// The Coordinator's REST API as the AppHost uses it, in the Contracts records: jobs, one job's status, workers, submit, stop.
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.AppHost;

public sealed class CoordinatorClient(Uri baseAddress, string token) : IDisposable
{
    // The Coordinator's JSON, the one shape of specs and statuses.
    static readonly JsonSerializerOptions Json = JobSpecJson.Options;

    readonly HttpClient http = new() { BaseAddress = baseAddress, Timeout = TimeSpan.FromSeconds(30) };

    public Uri BaseAddress => baseAddress;

    public async Task<IReadOnlyList<JobSummary>> JobsAsync(CancellationToken ct) =>
        await http.GetFromJsonAsync<JobSummary[]>("/jobs", Json, ct) ?? [];

    public async Task<JobStatus> JobAsync(string jobId, CancellationToken ct) =>
        await http.GetFromJsonAsync<JobStatus>($"/jobs/{Uri.EscapeDataString(jobId)}", Json, ct)
        ?? throw new InvalidOperationException($"GET /jobs/{jobId} returned no status");

    public async Task<IReadOnlyList<WorkerStatus>> WorkersAsync(CancellationToken ct) =>
        await http.GetFromJsonAsync<WorkerStatus[]>("/workers", Json, ct) ?? [];

    /// <summary>POST /jobs; the Coordinator's refusal (with its reasons) becomes an InvalidOperationException.</summary>
    public async Task<JobStatus> SubmitAsync(JobSpec spec, CancellationToken ct) =>
        await SendAsync(HttpMethod.Post, "/jobs", JsonContent.Create(spec, options: Json), "refused the job", ct);

    /// <summary>POST /jobs/{id}/stop: the job ends as Stopped and its workers are free for the next.</summary>
    public async Task<JobStatus> StopAsync(string jobId, CancellationToken ct) =>
        await SendAsync(HttpMethod.Post, $"/jobs/{Uri.EscapeDataString(jobId)}/stop", null, $"did not stop job {jobId}", ct);

    /// <summary>POST /studies with the spec's JSON: true when created, false when it already exists (an earlier run's).</summary>
    public async Task<bool> CreateStudyAsync(string specJson, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/studies") { Content = new StringContent(specJson, System.Text.Encoding.UTF8, "application/json") };
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
        using var response = await http.SendAsync(request, ct);
        if (response.StatusCode == System.Net.HttpStatusCode.Conflict) return false;
        if (!response.IsSuccessStatusCode)
            throw new InvalidOperationException($"the coordinator refused the study ({(int)response.StatusCode}): {await response.Content.ReadAsStringAsync(ct)}");
        return true;
    }

    public async Task<StudyStatus> StudyAsync(string studyId, CancellationToken ct) =>
        await http.GetFromJsonAsync<StudyStatus>($"/studies/{Uri.EscapeDataString(studyId)}", Json, ct)
        ?? throw new InvalidOperationException($"GET /studies/{studyId} returned no status");

    async Task<JobStatus> SendAsync(HttpMethod method, string path, HttpContent? content, string failure, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(method, path) { Content = content };
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
        using var response = await http.SendAsync(request, ct);
        if (!response.IsSuccessStatusCode)
            throw new InvalidOperationException($"the coordinator {failure} ({(int)response.StatusCode}): {await response.Content.ReadAsStringAsync(ct)}");
        return await response.Content.ReadFromJsonAsync<JobStatus>(Json, ct) ?? throw new InvalidOperationException($"{method} {path} returned no status");
    }

    public void Dispose() => http.Dispose();
}
