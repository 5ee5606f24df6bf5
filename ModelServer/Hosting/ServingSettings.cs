// Configuration section Serving (and Cluster:Token), bound and checked at start; docs/serving.md lists every key.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.Extensions.Configuration;

namespace DeepSeekCluster.ModelServer.Hosting;

/// <summary>A model to serve: a local folder (<paramref name="Path"/>) or a place in the CheckpointStore (<paramref name="Store"/>).</summary>
public sealed record ModelSource(string Version, string? Path, string Quantization, StoreModelRef? Store = null, string? Tokenizer = null);

public sealed record ServingSettings
{
    public required IReadOnlyList<ModelSource> Models { get; init; }
    public required IReadOnlyDictionary<string, IReadOnlyDictionary<string, double>> Routes { get; init; }
    public required IReadOnlySet<string> ApiKeys { get; init; }
    public string? ClusterToken { get; init; }
    public bool AllowAnonymous { get; init; }
    public required EngineOptions Engine { get; init; }
    public string Device { get; init; } = "cpu";
    public TimeSpan Drain { get; init; } = TimeSpan.FromMinutes(10);
    /// <summary>The CheckpointStore models are fetched from (Serving:Store), null when none is configured.</summary>
    public StoreAccess? Store { get; init; }

    public static ServingSettings From(IConfiguration configuration)
    {
        var section = configuration.GetSection("Serving");
        var models = new List<ModelSource>();
        foreach (var m in section.GetSection("Models").GetChildren())
        {
            string version = m["Version"] ?? throw new ArgumentException($"Serving:Models:{m.Key}:Version is required (the name requests use to pin this model)");
            string? path = m["Path"], store = m["Store"];
            if ((path is null) == (store is null))
                throw new ArgumentException($"Serving:Models:{m.Key} needs exactly one of Path (a Hugging Face model folder) and Store (exports/{{job}}/{{step}}/{{format}} or {{job}}/{{step}} in the CheckpointStore)");
            var inStore = store is null ? null : StoreModelRef.Parse(store, $"Serving:Models:{m.Key}:Store");
            models.Add(new ModelSource(version, path, m["Quantization"] ?? "fp32", inStore, m["Tokenizer"]));
        }
        if (models.Count == 0) throw new ArgumentException("Serving:Models names no model: set Serving:Models:0:Version and Serving:Models:0:Path");
        if (models.GroupBy(m => m.Version).FirstOrDefault(g => g.Count() > 1) is { } twice)
            throw new ArgumentException($"Serving:Models: version '{twice.Key}' appears twice");
        var routes = new Dictionary<string, IReadOnlyDictionary<string, double>>();
        foreach (var route in section.GetSection("Routes").GetChildren())
            routes[route.Key] = route.GetChildren().ToDictionary(v => v.Key, v => double.TryParse(v.Value, System.Globalization.CultureInfo.InvariantCulture, out var w)
                ? w : throw new ArgumentException($"Serving:Routes:{route.Key}:{v.Key} must be a number (a weight), got '{v.Value}'"));
        var keys = section.GetSection("ApiKeys").GetChildren().Select(k => k.Value).OfType<string>().Where(k => k.Length > 0).ToHashSet(StringComparer.Ordinal);
        var engine = new EngineOptions();
        section.Bind(engine);
        var settings = new ServingSettings
        {
            Store = StoreFrom(configuration, section, models.Any(m => m.Store is not null)),
            Models = models, Routes = routes, ApiKeys = keys, ClusterToken = configuration["Cluster:Token"] is { Length: > 0 } t ? t : null,
            AllowAnonymous = section.GetValue("AllowAnonymous", false), Engine = engine.Validated(), Device = section["Device"] ?? "cpu",
            Drain = TimeSpan.FromSeconds(section.GetValue("DrainSeconds", 600.0)),
        };
        if (settings.ApiKeys.Count == 0 && settings.ClusterToken is null && !settings.AllowAnonymous)
            throw new ArgumentException("no credentials: set Serving:ApiKeys:0 or Cluster:Token, or Serving:AllowAnonymous=true to serve without keys");
        return settings;
    }

    static StoreAccess? StoreFrom(IConfiguration configuration, IConfigurationSection section, bool required)
    {
        string? address = section["Store"];
        if (string.IsNullOrWhiteSpace(address))
            return required ? throw new ArgumentException("Serving:Store (the CheckpointStore's http(s) URL) is required when a model names a Store place") : null;
        if (!Uri.TryCreate(address, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            throw new ArgumentException($"Serving:Store '{address}' must be the http(s) URL of the CheckpointStore service");
        var tls = ClusterTls.Load(configuration[ClusterTls.CertificatePathKey], configuration[ClusterTls.KeyPathKey], configuration[ClusterTls.CaPathKey]);
        if (ClusterChannel.Problem(uri, tls, "Serving:Store") is { } problem) throw new ArgumentException(problem);
        string cache = section["ModelCache"] is { Length: > 0 } c ? c : Path.Combine(Path.GetTempPath(), "model-server-store");
        return new StoreAccess(uri, configuration["Cluster:Token"] is { Length: > 0 } t ? t : null, tls, cache);
    }
}
