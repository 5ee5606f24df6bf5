// The resource names every process uses for service discovery (Aspire's services__{name}__{endpoint}__0 convention).
namespace DeepSeekCluster.Contracts;

public static class ServiceNames
{
    public const string Coordinator = "coordinator";
    public const string GpuWorker = "gpu-worker";
    public const string DataShards = "data-shards";
    public const string Checkpoints = "checkpoints";
    public const string Blobs = "blobs";
}
