// The one JSON shape of job specs and statuses on every surface (REST, gRPC status_json and job_spec_json, the worker's
// assignment): camelCase, enums as camelCase names, nulls left out. The Coordinator writes with it, the worker reads with it.
using System.Text.Json;
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Contracts.Grains;

public static class JobSpecJson
{
    public static readonly JsonSerializerOptions Options = Configure(new JsonSerializerOptions(JsonSerializerDefaults.Web));

    /// <summary>Gives <paramref name="options"/> (ASP.NET's, for instance) this shape.</summary>
    public static JsonSerializerOptions Configure(JsonSerializerOptions options)
    {
        options.Converters.Add(new JsonStringEnumConverter(JsonNamingPolicy.CamelCase));
        options.DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull;
        return options;
    }

    /// <summary>
    /// The shape a user's spec is read in (POST /jobs, SubmitJob): as <see cref="Options"/>, but a field the spec does not
    /// have is refused, so "zero_stage" or "recompute" is named instead of training silently without it (docs/decisions.md).
    /// </summary>
    public static readonly JsonSerializerOptions Submitted = new(Options) { UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow };

    /// <summary>What <paramref name="e"/> says is wrong with a submitted spec, with the JSON path of the value (System.Text.Json leaves the path out of an unknown field's message).</summary>
    public static string Problem(JsonException e) =>
        e.Path is { Length: > 0 } path && !e.Message.Contains(path, StringComparison.Ordinal) ? $"{e.Message} Path: {path}" : e.Message;

    public static string Serialize(JobSpec spec) => JsonSerializer.Serialize(spec, Options);

    /// <summary>The spec in <paramref name="json"/>; a clear error naming <paramref name="what"/> when it is not one.</summary>
    public static JobSpec Deserialize(string json, string what)
    {
        if (string.IsNullOrWhiteSpace(json)) throw new InvalidDataException($"{what} carries no job spec");
        try
        {
            return JsonSerializer.Deserialize<JobSpec>(json, Options) ?? throw new InvalidDataException($"{what} carries a null job spec");
        }
        catch (JsonException e) { throw new InvalidDataException($"{what}: the job spec is not valid JSON of a job spec: {e.Message}", e); }
    }
}
