// The status page: static HTML, CSS and JavaScript embedded in this assembly (no CDN, nothing to install), served
// read-only at / and /status. The page itself polls the open GET endpoints of JobsApi.

namespace DeepSeekCluster.Coordinator.Api;

public static class StatusPage
{
    static readonly Dictionary<string, string> ContentTypes = new(StringComparer.OrdinalIgnoreCase)
    {
        [".html"] = "text/html; charset=utf-8",
        [".css"] = "text/css; charset=utf-8",
        [".js"] = "text/javascript; charset=utf-8",
    };

    /// <summary>File name → content, read once from the embedded wwwroot/ resources.</summary>
    static readonly Lazy<IReadOnlyDictionary<string, byte[]>> Assets = new(LoadAssets);

    public static IEndpointRouteBuilder MapStatusPage(this IEndpointRouteBuilder app)
    {
        app.MapGet("/", () => Serve("index.html"));
        app.MapGet("/status", () => Serve("index.html"));
        app.MapGet("/{asset:regex(^status\\.(css|js)$)}", (string asset) => Serve(asset));
        return app;
    }

    static IResult Serve(string name) =>
        Assets.Value.TryGetValue(name, out var content)
            ? Results.Bytes(content, ContentTypes[Path.GetExtension(name)])
            : Results.NotFound();

    static IReadOnlyDictionary<string, byte[]> LoadAssets()
    {
        var assembly = typeof(StatusPage).Assembly;
        var assets = new Dictionary<string, byte[]>(StringComparer.Ordinal);
        foreach (var resource in assembly.GetManifestResourceNames().Where(n => n.StartsWith("wwwroot/", StringComparison.Ordinal)))
        {
            using var stream = assembly.GetManifestResourceStream(resource)!;
            using var copy = new MemoryStream();
            stream.CopyTo(copy);
            assets[resource["wwwroot/".Length..]] = copy.ToArray();
        }
        foreach (var required in new[] { "index.html", "status.css", "status.js" })
            if (!assets.ContainsKey(required)) throw new InvalidOperationException($"the status page asset wwwroot/{required} is not embedded in {assembly.GetName().Name}");
        return assets;
    }
}
