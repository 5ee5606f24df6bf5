// A process the AppHost runs: its command, endpoints, environment, dependencies and replicas (Aspire's resource model, small).
namespace DeepSeekCluster.AppHost.Hosting;

public sealed record Endpoint(string Name, int Port, string Scheme = "http", bool Http2Only = false)
{
    public string Url => $"{Scheme}://127.0.0.1:{Port}";
}

public sealed class Resource
{
    public required string Name { get; init; }
    public required string Command { get; init; }
    public List<string> Args { get; } = new();
    public Dictionary<string, string> Environment { get; } = new(StringComparer.Ordinal);
    public List<Endpoint> Endpoints { get; } = new();
    public List<Resource> WaitsFor { get; } = new();
    public int Replicas { get; set; } = 1;
    /// <summary>
    /// Instances are named {Name}-{index} (gpu-worker-0, …): set by <see cref="WithReplicas"/>, for a resource whose
    /// instances come and go; otherwise the single instance is named as the resource.
    /// </summary>
    public bool Numbered { get; set; }
    /// <summary>HTTP path polled until it answers 200 before dependants start; null: started is ready.</summary>
    public string? HealthPath { get; set; }
    /// <summary>TCP port polled until it accepts, for resources without an HTTP health endpoint.</summary>
    public int? ReadinessPort { get; set; }
    public bool IsProject { get; init; }
    /// <summary>Environment worked out for each instance as it starts (the GPU a worker gets), after <see cref="Environment"/>.</summary>
    public Func<string, IEnumerable<KeyValuePair<string, string>>>? InstanceEnvironment { get; private set; }

    public Endpoint GetEndpoint(string name) =>
        Endpoints.FirstOrDefault(e => e.Name == name) ?? throw new InvalidOperationException($"resource '{Name}' has no endpoint '{name}'");

    // ---- Aspire-style chain ----

    public Resource WithEndpoint(string name, bool http2Only = false)
    {
        Endpoints.Add(new Endpoint(name, FreePort.Next(), Http2Only: http2Only));
        return this;
    }

    public Resource WithArgs(params string[] args) { Args.AddRange(args); return this; }

    public Resource WithEnvironment(string key, string value) { Environment[key] = value; return this; }

    /// <summary>Passes the other resource's endpoints as services__{name}__{endpoint}__0, as Aspire does.</summary>
    public Resource WithReference(Resource other)
    {
        foreach (var e in other.Endpoints) Environment[$"services__{other.Name}__{e.Name}__0"] = e.Url;
        return this;
    }

    public Resource WithConnectionString(string name, string value)
    {
        Environment[$"ConnectionStrings__{name}"] = value;
        return this;
    }

    public Resource WaitFor(Resource other) { WaitsFor.Add(other); return this; }

    /// <summary>Environment for one instance by its name (e.g. gpu-worker-1); it may refuse to start it by throwing InvalidOperationException.</summary>
    public Resource WithInstanceEnvironment(Func<string, IEnumerable<KeyValuePair<string, string>>> environment)
    {
        InstanceEnvironment = environment;
        return this;
    }

    public Resource WithReplicas(int n)
    {
        if (n < 0) throw new ArgumentOutOfRangeException(nameof(n), $"replicas of '{Name}' must be >= 0");
        Replicas = n;
        Numbered = true;
        return this;
    }

    public Resource WithHttpHealthCheck(string path = "/health") { HealthPath = path; return this; }
}
