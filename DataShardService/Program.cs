// DataShardService: corpus preparation and sample serving over gRPC; `prepare ...` runs the pipeline from the command line.
using DeepSeekCluster.DataShardService.Serving;

if (args.Length > 0 && args[0] == "prepare")
    return await PrepareCli.RunAsync(args[1..], new ConfigurationBuilder().AddEnvironmentVariables().Build(), CancellationToken.None);

var builder = WebApplication.CreateBuilder(args);
builder.AddServiceDefaults();
builder.AddDataShards();

var app = builder.Build();
app.MapDefaultEndpoints();
app.MapDataShards();
app.Run();
return 0;
