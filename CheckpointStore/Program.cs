// CheckpointStore: sharded, two-phase checkpoints over Azure Blob storage or a local folder, served over gRPC.
using DeepSeekCluster.CheckpointStore;

var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();
builder.AddCheckpointStore();

var app = builder.Build();
app.MapDefaultEndpoints();
app.MapCheckpointStore();
app.Run();
