// DataShardService: corpus preparation and sample serving over gRPC (issue: DataShardService). For now it only starts and answers its health endpoints.
var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();

var app = builder.Build();
app.MapDefaultEndpoints();
app.Run();
