// Models of the CRDs the manifests ship besides ServiceMonitor: PrometheusRule (checked rule by rule) and cert-manager's
// Issuer and Certificate (only parsed: their spec is kept as a tree). KubernetesClient has none of them.
using System.Text.Json.Serialization;
using k8s;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

[KubernetesEntity(Group = "monitoring.coreos.com", ApiVersion = "v1", Kind = "PrometheusRule", PluralName = "prometheusrules")]
public sealed class PrometheusRule : IKubernetesObject<V1ObjectMeta>
{
    [JsonPropertyName("apiVersion")] public string ApiVersion { get; set; } = "monitoring.coreos.com/v1";
    [JsonPropertyName("kind")] public string Kind { get; set; } = "PrometheusRule";
    [JsonPropertyName("metadata")] public V1ObjectMeta Metadata { get; set; } = new();
    [JsonPropertyName("spec")] public PrometheusRuleSpec Spec { get; set; } = new();
}

public sealed class PrometheusRuleSpec
{
    [JsonPropertyName("groups")] public List<RuleGroup> Groups { get; set; } = [];
}

public sealed class RuleGroup
{
    [JsonPropertyName("name")] public string Name { get; set; } = "";
    [JsonPropertyName("interval")] public string? Interval { get; set; }
    [JsonPropertyName("rules")] public List<Rule> Rules { get; set; } = [];
}

public sealed class Rule
{
    [JsonPropertyName("alert")] public string? Alert { get; set; }
    [JsonPropertyName("record")] public string? Record { get; set; }
    [JsonPropertyName("expr")] public string Expr { get; set; } = "";
    [JsonPropertyName("for")] public string? For { get; set; }
    [JsonPropertyName("labels")] public Dictionary<string, string>? Labels { get; set; }
    [JsonPropertyName("annotations")] public Dictionary<string, string>? Annotations { get; set; }
}

[KubernetesEntity(Group = "cert-manager.io", ApiVersion = "v1", Kind = "Certificate", PluralName = "certificates")]
public sealed class Certificate : IKubernetesObject<V1ObjectMeta>
{
    [JsonPropertyName("apiVersion")] public string ApiVersion { get; set; } = "cert-manager.io/v1";
    [JsonPropertyName("kind")] public string Kind { get; set; } = "Certificate";
    [JsonPropertyName("metadata")] public V1ObjectMeta Metadata { get; set; } = new();
    [JsonPropertyName("spec")] public Dictionary<string, object> Spec { get; set; } = [];
}

[KubernetesEntity(Group = "cert-manager.io", ApiVersion = "v1", Kind = "Issuer", PluralName = "issuers")]
public sealed class Issuer : IKubernetesObject<V1ObjectMeta>
{
    [JsonPropertyName("apiVersion")] public string ApiVersion { get; set; } = "cert-manager.io/v1";
    [JsonPropertyName("kind")] public string Kind { get; set; } = "Issuer";
    [JsonPropertyName("metadata")] public V1ObjectMeta Metadata { get; set; } = new();
    [JsonPropertyName("spec")] public Dictionary<string, object> Spec { get; set; } = [];
}
