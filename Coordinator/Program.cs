// Coordinator: Orleans silo, ClusterControl gRPC and REST API (issue: the cluster). For now it only starts and answers its health endpoints.
var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();

var app = builder.Build();
app.MapDefaultEndpoints();
app.Run();
