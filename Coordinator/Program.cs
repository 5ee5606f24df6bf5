// Coordinator: Orleans silo (jobs, workers, generations), ClusterControl gRPC for workers, REST for people and scripts.
using DeepSeekCluster.Coordinator;

var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();
builder.AddCoordinator();

var app = builder.Build();
app.MapDefaultEndpoints();
app.MapCoordinator();
app.Run();
