// The part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) that k8s/prometheus uses; KubernetesClient
// has no model for CRDs, and a strict parse into this one still rejects a misspelt field.
using System.Text.Json.Serialization;
using k8s;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

[KubernetesEntity(Group = "monitoring.coreos.com", ApiVersion = "v1", Kind = "ServiceMonitor", PluralName = "servicemonitors")]
public sealed class ServiceMonitor : IKubernetesObject<V1ObjectMeta>
{
    public const string ApiVersionValue = "monitoring.coreos.com/v1";
    public const string KindValue = "ServiceMonitor";

    [JsonPropertyName("apiVersion")] public string ApiVersion { get; set; } = ApiVersionValue;
    [JsonPropertyName("kind")] public string Kind { get; set; } = KindValue;
    [JsonPropertyName("metadata")] public V1ObjectMeta Metadata { get; set; } = new();
    [JsonPropertyName("spec")] public ServiceMonitorSpec Spec { get; set; } = new();
}

public sealed class ServiceMonitorSpec
{
    [JsonPropertyName("jobLabel")] public string? JobLabel { get; set; }
    [JsonPropertyName("selector")] public V1LabelSelector Selector { get; set; } = new();
    [JsonPropertyName("endpoints")] public List<ServiceMonitorEndpoint> Endpoints { get; set; } = [];
}

public sealed class ServiceMonitorEndpoint
{
    [JsonPropertyName("port")] public string? Port { get; set; }
    [JsonPropertyName("path")] public string? Path { get; set; }
    [JsonPropertyName("scheme")] public string? Scheme { get; set; }
    [JsonPropertyName("interval")] public string? Interval { get; set; }
    [JsonPropertyName("relabelings")] public List<RelabelConfig>? Relabelings { get; set; }
}

public sealed class RelabelConfig
{
    [JsonPropertyName("sourceLabels")] public List<string>? SourceLabels { get; set; }
    [JsonPropertyName("targetLabel")] public string? TargetLabel { get; set; }
    [JsonPropertyName("action")] public string? Action { get; set; }
    [JsonPropertyName("regex")] public string? Regex { get; set; }
    [JsonPropertyName("replacement")] public string? Replacement { get; set; }
}
