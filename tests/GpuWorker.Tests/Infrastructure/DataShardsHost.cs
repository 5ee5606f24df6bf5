// The real DataShards service in this process (Kestrel on a free loopback port, HTTP/2) with one small dataset prepared
// from the shipped corpus, and a server interceptor that records every GetBatch call the service receives and can hold
// chosen calls until the test lets them go: what the sample-source tests count calls by (never wall time).
using System.Buffers.Binary;
using System.Net;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Serving;
using DeepSeekCluster.Text.Data;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class DataShardsHost : IAsyncDisposable
{
    public const int SeqLen = 16;

    readonly WebApplication app;
    readonly string folder;
    bool stopped;

    DataShardsHost(WebApplication app, string folder, string address, GetBatchLog calls)
    {
        (this.app, this.folder, Calls) = (app, folder, calls);
        Address = new Uri(address);
        Channel = GrpcChannel.ForAddress(address);
        Client = new DataShards.DataShardsClient(Channel);
    }

    public Uri Address { get; }
    public GrpcChannel Channel { get; }
    public DataShards.DataShardsClient Client { get; }
    public GetBatchLog Calls { get; }
    public string DatasetId { get; private set; } = "";
    public DatasetManifest Manifest { get; private set; } = null!;

    /// <summary>Starts the service and prepares a dataset of a few chapters (seq_len 16, vocab 300, 64 samples a shard).</summary>
    public static async Task<DataShardsHost> StartAsync()
    {
        string folder = Directory.CreateTempSubdirectory("data-shards-").FullName;
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing", ContentRootPath = folder });
        builder.Configuration["DataShards:Root"] = Path.Combine(folder, "datasets");
        builder.Configuration["DataShards:WorkDir"] = Path.Combine(folder, "work");
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, o => o.Protocols = HttpProtocols.Http2));
        builder.AddDataShards();
        var calls = new GetBatchLog();
        builder.Services.AddGrpc(o => o.Interceptors.Add<RecordingInterceptor>(calls));
        var app = builder.Build();
        app.MapDataShards();
        await app.StartAsync();
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        var host = new DataShardsHost(app, folder, address, calls);
        try { await host.PrepareAsync(); }
        catch { await host.DisposeAsync(); throw; }
        return host;
    }

    async Task PrepareAsync()
    {
        string input = Directory.CreateDirectory(Path.Combine(folder, "input")).FullName;
        await File.WriteAllTextAsync(Path.Combine(input, "kjv.txt"), string.Join("\n\n", ShippedCorpus.Documents().Take(6)) + "\n");
        var reply = await Client.PrepareAsync(new PrepareRequest
        {
            SeqLen = SeqLen, VocabSize = 300, SamplesPerShard = 64, ValidationFraction = 0.2,
            Sources = { new Source { Name = "kjv", Path = input } },
        });
        DatasetId = reply.DatasetId;
        var m = await Client.GetManifestAsync(new GetManifestRequest { DatasetId = DatasetId });
        Manifest = DatasetManifest.FromJson(m.ManifestJson, "test dataset");
    }

    /// <summary>
    /// The samples at global indices [start, start + count) of the permutation of <paramref name="seed"/>, read straight
    /// from the stored shard files (not through the service): the independent reference.
    /// </summary>
    public long[] ReadDirectly(string split, ulong seed, long start, int count)
    {
        var entry = Manifest.Splits[split];
        var permutation = new SamplePermutation(entry.Samples, seed);
        int row = Manifest.SampleTokens;
        var tokens = new long[count * row];
        for (int i = 0; i < count; i++)
        {
            long index = permutation.SampleAt(start + i);
            var shard = entry.Shards[(int)(index / Manifest.SamplesPerShard)];
            using var file = File.OpenHandle(Path.Combine(folder, "datasets", DatasetId, shard.Path));
            var record = new byte[Manifest.RecordBytes];
            Assert.Equal(record.Length, RandomAccess.Read(file, record, index % Manifest.SamplesPerShard * Manifest.RecordBytes));
            for (int t = 0; t < row; t++) tokens[i * row + t] = BinaryPrimitives.ReadUInt16LittleEndian(record.AsSpan(2 * t));
        }
        return tokens;
    }

    /// <summary>Stops the service at once: connections are aborted, a held call ends with an error at its client.</summary>
    public async Task StopAsync()
    {
        if (stopped) return;
        stopped = true;
        try { await app.StopAsync(new CancellationToken(canceled: true)); }
        catch (OperationCanceledException) { } // the cancelled token is the point: no graceful drain
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await StopAsync();
        await app.DisposeAsync();
        try { Directory.Delete(folder, recursive: true); } catch (IOException) { }
    }

    sealed class RecordingInterceptor(GetBatchLog log) : Interceptor
    {
        public override async Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream,
            ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
        {
            if (request is GetBatchRequest r)
            {
                // A faulty service: the call is served as rewritten (and logged so), whatever the client asked for.
                if (log.Rewrite?.Invoke(r) is { } rewritten) request = (TRequest)(object)(r = rewritten);
                await log.EnterAsync(r, context.CancellationToken);
            }
            await continuation(request, responseStream, context);
        }
    }
}

/// <summary>
/// Every GetBatch call the service received, in order; calls matching <see cref="Hold"/> wait until released or cancelled.
/// Tests tell their calls apart by the permutation seed (each uses its own), so a late call of another test never counts.
/// </summary>
public sealed class GetBatchLog
{
    readonly List<GetBatchCall> calls = [];
    volatile TaskCompletionSource release = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public sealed record GetBatchCall(ulong Seed, string Split, long Start, int Count)
    {
        public volatile bool Held;
        public volatile bool CancelledWhileHeld;
        public long End => Start + Count;
    }

    /// <summary>Rewrites a call before the service serves it (null, or a null result: served as asked).</summary>
    public volatile Func<GetBatchRequest, GetBatchRequest?>? Rewrite;

    /// <summary>Calls this holds before the service sees them (null: none).</summary>
    public volatile Func<GetBatchRequest, bool>? Hold;

    /// <summary>The calls made with permutation seed <paramref name="seed"/>, in the order the service received them.</summary>
    public IReadOnlyList<GetBatchCall> Of(ulong seed) { lock (calls) return calls.Where(c => c.Seed == seed).ToList(); }

    /// <summary>Lets every held call go on, and holds no more until <see cref="Hold"/> is set again.</summary>
    public void ReleaseAll()
    {
        Hold = null;
        var released = release;
        release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        released.TrySetResult();
    }

    internal async Task EnterAsync(GetBatchRequest r, CancellationToken ct)
    {
        var call = new GetBatchCall(r.Seed, r.Split, r.Start, r.Count);
        var released = release.Task;
        lock (calls) calls.Add(call);
        if (Hold?.Invoke(r) != true) return;
        call.Held = true;
        try { await released.WaitAsync(ct); }
        catch (OperationCanceledException) { call.CancelledWhileHeld = true; throw; }
    }
}
