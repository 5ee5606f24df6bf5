// Meter "DeepSeekCluster.Coordinator": refusals (auth and stale generations) and rescales. Tags never carry secrets.
using System.Diagnostics.Metrics;

namespace DeepSeekCluster.Coordinator;

public sealed class CoordinatorMetrics
{
    public const string MeterName = "DeepSeekCluster.Coordinator";

    private readonly Counter<long> _authRefusals;
    private readonly Counter<long> _staleRefusals;
    private readonly Counter<long> _formations;

    public CoordinatorMetrics(IMeterFactory meterFactory)
    {
        var meter = meterFactory.Create(MeterName);
        _authRefusals = meter.CreateCounter<long>("deepseek_coordinator_auth_refusals", description: "Requests refused for a missing or wrong cluster token");
        _staleRefusals = meter.CreateCounter<long>("deepseek_coordinator_stale_generation_refusals", description: "Reports refused because they came from an older generation");
        _formations = meter.CreateCounter<long>("deepseek_coordinator_formations", description: "Worker-set formations (each bumps a job's generation)");
    }

    /// <param name="surface">rest or grpc.</param>
    /// <param name="reason">missing or wrong.</param>
    public void AuthRefused(string surface, string reason) =>
        _authRefusals.Add(1, new KeyValuePair<string, object?>("surface", surface), new KeyValuePair<string, object?>("reason", reason));

    public void StaleRefused(string what) => _staleRefusals.Add(1, new KeyValuePair<string, object?>("what", what));

    public void Formed(bool rescale) => _formations.Add(1, new KeyValuePair<string, object?>("kind", rescale ? "rescale" : "initial"));
}
