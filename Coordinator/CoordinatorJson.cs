// The JSON shape of job specs and statuses on every surface (REST, gRPC status_json, assignments): camelCase, enums as names.
using System.Text.Json;
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Coordinator;

public static class CoordinatorJson
{
    public static readonly JsonSerializerOptions Options = Configure(new JsonSerializerOptions(JsonSerializerDefaults.Web));

    public static JsonSerializerOptions Configure(JsonSerializerOptions options)
    {
        options.Converters.Add(new JsonStringEnumConverter(JsonNamingPolicy.CamelCase));
        options.DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull;
        return options;
    }
}
