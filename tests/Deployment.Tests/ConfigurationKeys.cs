// Which configuration keys each service reads (scanned from its C# sources), and which of them Kubernetes must set.
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Deployment.Tests;

public static partial class ConfigurationKeys
{
    /// <summary>Kubernetes workload → the project folder whose sources it runs.</summary>
    public static readonly IReadOnlyDictionary<string, string> ProjectOf = new Dictionary<string, string>
    {
        ["coordinator"] = "Coordinator",
        ["gpu-worker"] = "GpuWorker",
        ["data-shards"] = "DataShardService",
        ["checkpoints"] = "CheckpointStore",
        ["model-server"] = "ModelServer",
    };

    static readonly string[] HttpEndpoint = ["Kestrel:Endpoints:http:Url", "Kestrel:Endpoints:http:Protocols"];
    static readonly string[] GrpcEndpoint = ["Kestrel:Endpoints:grpc:Url", "Kestrel:Endpoints:grpc:Protocols"];
    // Before the dictionaries that spread it: static fields initialise in the order they are written.
    static readonly string[] ClusterTlsKeys = ["Cluster:Tls:CertificatePath", "Cluster:Tls:KeyPath", "Cluster:Tls:CaPath"];

    /// <summary>
    /// Keys Kubernetes must set for each workload: without them the process would fall back to a loopback or
    /// local-folder default that is wrong in a pod (a relative folder under the read-only /app, localhost clustering,
    /// a generated token no worker knows). Kestrel's and the services__ keys are read by the framework, not our code.
    /// </summary>
    public static readonly IReadOnlyDictionary<string, string[]> Required = new Dictionary<string, string[]>
    {
        ["coordinator"] = ["ConnectionStrings:orleans-redis", "services:checkpoints:grpc:0", "Cluster:Token", "Coordinator:StateFolder", "Orleans:ClusterId", "Orleans:ServiceId", .. HttpEndpoint, .. GrpcEndpoint],
        // Cluster:Token on the two storage services: unset, their gRPC calls are open to any caller (ClusterTokenGate).
        ["data-shards"] = ["DataShards:Root", "DataShards:WorkDir", "DataShards:CacheDir", "DataShards:Container", "Cluster:Token", .. HttpEndpoint, .. GrpcEndpoint],
        ["checkpoints"] = ["Storage:Folder", "Storage:Container", "Cluster:Token", .. HttpEndpoint, .. GrpcEndpoint],
        // The worker binds the Worker section and reads the services: addresses and the token through configuration
        // (GpuWorker/Cluster/WorkerSettings.cs); DEEPSEEK_INSTANCE and POD_IP are its fallbacks for Worker:Id and CollectiveHost.
        ["gpu-worker"] = ["services:coordinator:grpc:0", "services:data-shards:grpc:0", "services:checkpoints:grpc:0", "Cluster:Token",
                          "DEEPSEEK_INSTANCE", "POD_IP", "Worker:CollectivePort", "Worker:PipelinePort", "Worker:OutputDir", "Worker:StayAfterLeave", .. HttpEndpoint],
        // The model server: what it serves (a folder on the models volume, its route) and who may call it (the token).
        ["model-server"] = ["Cluster:Token", "Serving:Models:0:Version", "Serving:Models:0:Path", .. HttpEndpoint],
    };

    /// <summary>Required in the deployable overlays only (the base runs on folders).</summary>
    public static readonly IReadOnlyDictionary<string, string[]> RequiredInOverlays = new Dictionary<string, string[]>
    {
        ["data-shards"] = ["ConnectionStrings:blobs"],
        ["checkpoints"] = ["ConnectionStrings:blobs"],
    };

    /// <summary>Keys the code reads whose defaults are right in a pod, or that Kubernetes must not set.</summary>
    public static readonly IReadOnlyDictionary<string, string[]> DefaultIsRight = new Dictionary<string, string[]>
    {
        ["*"] = ["OTEL_EXPORTER_OTLP_ENDPOINT"], // optional: OTLP only where a collector runs; Prometheus scrapes /metrics
        // Cluster:Tls:* (every process): optional; unset is cleartext gRPC (with the token for ClusterControl), set by the
        // opt-in component k8s/components/mtls, which mounts the certificate Secrets (docs/kubernetes.md).
        // Coordinator:Quotas:<tenant> (docs/agent.md): unset, no tenant is capped. Coordinator:PreemptionCheckpointTimeout
        // (docs/scheduling.md): 60 s for a preempted job to commit its checkpoint before its workers go.
        ["coordinator"] = ["Coordinator:HeartbeatTimeout", "Coordinator:ReconnectGrace", "Coordinator:LossHistory", "Coordinator:Quotas", "Coordinator:PreemptionCheckpointTimeout", "Orleans:SiloPort", "Orleans:GatewayPort", .. ClusterTlsKeys],
        ["data-shards"] = ["DataShards:BlockBytes", "DataShards:BlobConnection" /* bound, then replaced by ConnectionStrings:blobs */,
            "DataShards:BlobRetries", "DataShards:BlobRetryDelaySeconds", "DataShards:BlobRetryMaxDelaySeconds", "DataShards:BlobNetworkTimeoutSeconds", .. ClusterTlsKeys],
        ["checkpoints"] = ["Storage:RetryCount", "Storage:RetryBaseDelayMs", "Storage:RetryMaxDelayMs", "Storage:BlockBytes", "Storage:NetworkTimeoutSeconds", .. ClusterTlsKeys],
        // Worker:Id falls back to DEEPSEEK_INSTANCE (the pod name), Worker:CollectiveHost to POD_IP; Worker:Device is auto.
        // Worker:HeartbeatInterval (1 s) and Worker:CollectiveTimeout (30 s) suit a pod as they are.
        // Kestrel:Endpoints:grpc:Url: ServiceDefaults' mutual-TLS server setup reads it, which the worker (no gRPC server) never calls.
        // Worker:MemoryBudgetBytes: unset is the device's memory (the GPU's, or the pod's limit as .NET sees it);
        // Worker:InjectFault is for drills and tests only and must stay unset in a deployment.
        // Serving:ApiKeys comes from an optional Secret; without it only the cluster token is accepted. Cluster:Tls:* is read by
        // its store client, which dials the CheckpointStore only when a model names a Store place (unset in the base: it serves
        // from the models volume; the mtls component mounts its client certificate). Its API stays plain HTTP.
        ["model-server"] = ["Serving:ApiKeys", "Serving:Device", .. ClusterTlsKeys, "Kestrel:Endpoints:grpc:Url"],
        ["gpu-worker"] = ["Worker:Id", "Worker:CollectiveHost", "Worker:Device", "Worker:HeartbeatInterval", "Worker:CollectiveTimeout", .. ClusterTlsKeys,
                          "Kestrel:Endpoints:grpc:Url", "Worker:MemoryBudgetBytes", "Worker:InjectFault"],
    };

    /// <summary>Folder keys: each must point into a volume the container mounts (the root filesystem is read-only).</summary>
    public static readonly string[] FolderKeys = ["Coordinator:StateFolder", "DataShards:Root", "DataShards:WorkDir", "DataShards:CacheDir", "Storage:Folder", "Worker:OutputDir"];

    /// <summary>Every configuration key the sources of a project folder read (ServiceDefaults' included), A:B form.</summary>
    public static IReadOnlySet<string> ReadBy(string projectFolder)
    {
        var constants = Constants();
        var keys = new HashSet<string>(StringComparer.OrdinalIgnoreCase);
        foreach (var file in Repository.SourcesOf(projectFolder).Concat(Repository.SourcesOf("ServiceDefaults")))
        {
            string code = File.ReadAllText(file);
            foreach (Match m in ConnectionString().Matches(code))
                keys.Add("ConnectionStrings:" + Resolve(m.Groups[1].Value, constants, file));
            foreach (Match m in Indexer().Matches(code))
                keys.Add(Resolve(m.Groups[1].Value, constants, file));
            foreach (Match m in GetValue().Matches(code))
                keys.Add(Resolve(m.Groups[1].Value, constants, file));
            // Environment variables read directly, by literal name (A__B is the configuration key A:B).
            foreach (Match m in EnvironmentVariable().Matches(code))
                keys.Add(m.Groups[1].Value.Replace("__", ":"));
            foreach (Match m in Bind().Matches(code))
            {
                string type = m.Groups[1].Value;
                string section = constants.TryGetValue($"{type}.Section", out var s) ? s
                    : throw new InvalidOperationException($"{file}: BindConfiguration({type}.Section) but no const Section in class {type}");
                foreach (var property in SettableProperties(type)) keys.Add($"{section}:{property}");
            }
        }
        return keys;
    }

    static string Resolve(string expression, IReadOnlyDictionary<string, string> constants, string file)
    {
        expression = expression.Trim();
        if (expression.StartsWith("$\"", StringComparison.Ordinal))
            return Interpolation().Replace(expression[2..^1], h => constants.TryGetValue(h.Groups[1].Value, out var v) ? v : Unresolved(h.Value));
        if (expression.StartsWith('"')) return expression[1..^1];
        if (constants.TryGetValue(expression, out var value)) return value;
        string last = expression.Split('.')[^1];
        var byName = constants.Where(kv => kv.Key.EndsWith("." + last, StringComparison.Ordinal)).Select(kv => kv.Value).Distinct().ToList();
        return byName.Count == 1 ? byName[0] : Unresolved(expression);

        string Unresolved(string e) => throw new InvalidOperationException($"{file}: cannot resolve the configuration key expression {e}");
    }

    /// <summary>"Class.Name" → value of every `const string Name = "..."` in the repository's service sources.</summary>
    static Dictionary<string, string> Constants()
    {
        var map = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var folder in ProjectOf.Values.Append("Contracts").Append("ServiceDefaults"))
            foreach (var file in Repository.SourcesOf(folder))
            {
                string code = File.ReadAllText(file);
                foreach (Match c in ClassDeclaration().Matches(code))
                {
                    string body = code[c.Index..];
                    int next = ClassDeclaration().Match(code, c.Index + c.Length) is { Success: true } n ? n.Index - c.Index : body.Length;
                    foreach (Match k in Constant().Matches(body[..next]))
                        map[$"{c.Groups[1].Value}.{k.Groups[1].Value}"] = k.Groups[2].Value.StartsWith('$') ? k.Groups[2].Value : k.Groups[2].Value[1..^1];
                }
            }
        // Interpolated constants ($"services:{ServiceNames.Checkpoints}:grpc:0") take the values of the constants they name.
        foreach (var key in map.Keys.Where(k => map[k].StartsWith("$\"", StringComparison.Ordinal)).ToList())
            map[key] = Interpolation().Replace(map[key][2..^1], h =>
                map.TryGetValue(h.Groups[1].Value, out var v) ? v
                : throw new InvalidOperationException($"constant {key}: cannot resolve {h.Value}"));
        return map;
    }

    static IEnumerable<string> SettableProperties(string type)
    {
        foreach (var folder in ProjectOf.Values)
            foreach (var file in Repository.SourcesOf(folder))
            {
                string code = File.ReadAllText(file);
                var c = Regex.Match(code, $@"\bclass\s+{Regex.Escape(type)}\b");
                if (!c.Success) continue;
                string body = code[c.Index..];
                int next = ClassDeclaration().Match(body, 1) is { Success: true } n ? n.Index : body.Length;
                return SettableProperty().Matches(body[..next]).Select(p => p.Groups[1].Value).ToList();
            }
        throw new InvalidOperationException($"no class {type} in the service sources");
    }

    [GeneratedRegex(@"GetConnectionString\(([^)]+)\)")] private static partial Regex ConnectionString();
    [GeneratedRegex(@"\b(?:config|configuration|Configuration)\[([^\]]+)\]")] private static partial Regex Indexer();
    [GeneratedRegex(@"\b(?:config|configuration|Configuration)\.GetValue(?:<[^>]+>)?\((""[^""]+""|\$""[^""]+"")")] private static partial Regex GetValue();
    [GeneratedRegex(@"Environment\.GetEnvironmentVariable\(""([^""{}]+)""\)")] private static partial Regex EnvironmentVariable();
    [GeneratedRegex(@"AddOptions<(\w+)>\(\)\s*\.BindConfiguration\(\w+\.Section\)")] private static partial Regex Bind();
    [GeneratedRegex(@"\{([\w.]+)\}")] private static partial Regex Interpolation();
    [GeneratedRegex(@"\b(?:class|record|struct)\s+(\w+)")] private static partial Regex ClassDeclaration();
    [GeneratedRegex(@"const\s+string\s+(\w+)\s*=\s*(\$?""[^""]*"")")] private static partial Regex Constant();
    [GeneratedRegex(@"public\s+[\w<>?,\[\] ]+?\s+(\w+)\s*\{\s*get;\s*set;")] private static partial Regex SettableProperty();
}
