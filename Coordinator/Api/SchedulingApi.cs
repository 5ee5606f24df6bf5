// REST for the registry's scheduling decisions (docs/agent.md, "Sharing the cluster"): open to read, as /workers is.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Api;

public static class SchedulingApi
{
    public static IEndpointRouteBuilder MapSchedulingApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/scheduling", async (IGrainFactory grains) =>
            Results.Ok(await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListDecisionsAsync()));
        return app;
    }
}
