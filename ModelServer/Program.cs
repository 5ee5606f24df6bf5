// model-server: OpenAI-compatible HTTP serving of Hugging Face model folders (docs/serving.md).
using DeepSeekCluster.ModelServer.Hosting;

var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();
builder.AddModelServer();

var app = builder.Build();
app.MapDefaultEndpoints();
app.MapModelServer();
app.Run();
