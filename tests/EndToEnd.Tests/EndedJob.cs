// The Coordinator's record of a job that ended (GET /jobs/{id}) and the questions the SIGKILL tests ask of it: which
// event followed which, and whether the ledger holds every sample once.
using System.Text.Json;

namespace DeepSeekCluster.EndToEnd.Tests;

internal sealed class EndedJob : IDisposable
{
    readonly JsonDocument document;
    readonly List<JsonElement> events;

    EndedJob(JsonDocument document)
    {
        this.document = document;
        events = Job.GetProperty("events").EnumerateArray().ToList();
    }

    public JsonElement Job => document.RootElement;
    public IReadOnlyList<JsonElement> Events => events;

    /// <summary>
    /// Waits for the AppHost's "job … ended" line, fails unless the job completed every one of <paramref name="steps"/>,
    /// and reads its record from the Coordinator.
    /// </summary>
    public static async Task<EndedJob> CompletedAsync(ElasticTests.AppHostProcess host, HttpClient coordinator, string jobId, long steps)
    {
        var ended = host.WaitFor(@"job (\S+) ended: (\w+)", TimeSpan.FromMinutes(10));
        Assert.True(ended.Groups[2].Value == "Completed", "the job did not complete:\n" + host.Output);
        var job = new EndedJob(JsonDocument.Parse(await coordinator.GetStringAsync($"/jobs/{jobId}")));
        Assert.Equal("completed", job.Job.GetProperty("state").GetString());
        Assert.Equal(steps, job.Job.GetProperty("step").GetInt64());
        return job;
    }

    public static string Kind(JsonElement e) => e.GetProperty("kind").GetString()!;

    /// <summary>The index of the first event of <paramref name="kind"/> at or after <paramref name="from"/> (about <paramref name="workerId"/> when given); fails when there is none.</summary>
    public int IndexOf(string kind, int from = 0, string? workerId = null)
    {
        int found = events.FindIndex(from, e => Kind(e) == kind && (workerId is null || e.GetProperty("workerId").GetString() == workerId));
        Assert.True(found >= from, $"no {kind} event{(workerId is null ? "" : $" for {workerId}")}{(from > 0 ? $" after event {from}" : "")}:\n" + string.Join("\n", Events));
        return found;
    }

    /// <summary>Every step's global batch consumed once: the ledger is complete, holds <paramref name="samples"/>, no overlap.</summary>
    public JsonElement AssertExactlyOnce(long samples)
    {
        var consumption = Job.GetProperty("consumption");
        Assert.True(consumption.GetProperty("complete").GetBoolean(), "the ledger is not complete: " + consumption);
        Assert.Equal(samples, consumption.GetProperty("samples").GetInt64());
        Assert.Equal(0, consumption.GetProperty("overlaps").GetInt64());
        return consumption;
    }

    /// <summary>The steps of the job's committed checkpoints.</summary>
    public List<long> Committed => Job.GetProperty("committed").EnumerateArray().Select(c => c.GetProperty("step").GetInt64()).ToList();

    public void Dispose() => document.Dispose();
}
