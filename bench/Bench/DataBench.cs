// Data benchmark: prepare throughput per stage (MB/s of raw text, one core) on the shipped corpus, and sample
// serving throughput (tokens/s) over loopback gRPC. Not a test: it prints a markdown table and asserts nothing.
using System.Diagnostics;
using System.Net;
using System.Text;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Serving;
using DeepSeekCluster.DataShardService.Storage;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.Bench;

public static class DataBench
{
    /// <summary>Flags: --vocab N (512), --seq-len N (128), --batch N samples per GetBatch call (256), --seconds S of serving (5).</summary>
    public static void Run(string[] args) => RunAsync(args).GetAwaiter().GetResult();

    private static async Task RunAsync(string[] args)
    {
        var o = new BenchArgs("data", args);
        int vocab = o.Int("--vocab", 512, 2), seqLen = o.Int("--seq-len", 128, 1), batch = o.Int("--batch", 256, 1);
        double serveSeconds = o.Int("--seconds", 5, 1);
        o.Done();
        string work = Path.Combine(Path.GetTempPath(), $"deepseek-databench-{Guid.NewGuid():N}");
        Directory.CreateDirectory(work);
        try
        {
            Console.WriteLine($"# DeepSeekCluster data benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
            Console.WriteLine($"machine: {Environment.ProcessorCount} cores; corpus {ShippedCorpus.Locate()}; vocab {vocab}, seq_len {seqLen}");
            Console.WriteLine();
            var rows = await PrepareStagesAsync(work, vocab, seqLen);
            Console.WriteLine("| prepare stage (one core) | MB/s of raw text | seconds | note |");
            Console.WriteLine("|---|---|---|---|");
            foreach (var (stage, mbps, seconds, note) in rows)
                Console.WriteLine($"| {stage} | {mbps:F1} | {seconds:F2} | {note} |");
            Console.WriteLine();
            await ServingAsync(work, vocab, seqLen, batch, serveSeconds);
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    // ---- Prepare, stage by stage, each on one thread over the whole corpus ----

    private static async Task<List<(string Stage, double MBps, double Seconds, string Note)>> PrepareStagesAsync(string work, int vocab, int seqLen)
    {
        var rows = new List<(string, double, double, string)>();
        var sw = Stopwatch.StartNew();
        var raw = ShippedCorpus.Documents().ToList();
        double mb = raw.Sum(d => (long)Encoding.UTF8.GetByteCount(d)) / 1e6;
        rows.Add(("read (gunzip + split)", mb / sw.Elapsed.TotalSeconds, sw.Elapsed.TotalSeconds, $"{raw.Count} documents, {mb:F2} MB"));

        var cleaner = new TextCleaner(new CleaningSpec());
        sw.Restart();
        var cleaned = raw.Select(cleaner.Clean).Where(t => t is not null).Select(t => t!).ToList();
        rows.Add(("clean (NFC, controls, filters)", mb / sw.Elapsed.TotalSeconds, sw.Elapsed.TotalSeconds,
            $"{cleaner.Counts.Kept} kept; {cleaner.Counts.RemovedDuplicateNGrams} by duplicate 5-grams, {cleaner.Counts.RemovedRepeatedLines} by repeated lines"));

        var dedup = new Deduplicator(new DedupSpec());
        sw.Restart();
        var kept = cleaned.Where(t => dedup.Check(t, Deduplicator.TextHash(t)) == DedupVerdict.Unique).ToList();
        rows.Add(("dedup (SHA-256 exact + MinHash 128/32)", mb / sw.Elapsed.TotalSeconds, sw.Elapsed.TotalSeconds, $"{kept.Count} kept"));

        sw.Restart();
        var tokenizer = BpeTokenizer.Train(kept, vocab);
        rows.Add(("tokenizer training (once per dataset)", mb / sw.Elapsed.TotalSeconds, sw.Elapsed.TotalSeconds, $"vocab {tokenizer.VocabSize}"));

        // Encode speed on one thread. JIT first: a throwaway copy of the tokenizer encodes the whole corpus so the
        // timed passes run tier-1 code; then a fresh copy (empty piece cache, as at the start of a prepare) encodes
        // it once, and a second pass shows the warm-cache rate a long prepare settles at. Process CPU time is given
        // beside wall time because the machine may be shared: MB/s per CPU-second is the per-core figure.
        int eot = tokenizer.EosTokenId!.Value;
        string tokenizerJson = tokenizer.ToJson();
        foreach (var t in kept) _ = BpeTokenizer.FromJson(tokenizerJson, "bench").Encode(t);
        var fresh = BpeTokenizer.FromJson(tokenizerJson, "bench");
        var tokens = new List<int[]>(kept.Count);
        var (wall, cpu) = Timed(() =>
        {
            foreach (var t in kept) tokens.Add([.. fresh.Encode(t), eot]);
        });
        long tokenCount = tokens.Sum(t => (long)t.Length);
        rows.Add(("tokenize, cold cache (byte-level BPE encode)", mb / wall, wall,
            $"{mb / cpu:F1} MB/s per CPU-second; {tokenCount / 1e6:F2} M tokens, {tokenCount / cpu / 1e6:F2} M tokens per CPU-second; goal ≥ 10 MB/s"));
        (wall, cpu) = Timed(() =>
        {
            foreach (var t in kept) _ = fresh.Encode(t);
        });
        rows.Add(("tokenize, warm cache (second pass)", mb / wall, wall, $"{mb / cpu:F1} MB/s per CPU-second"));

        string staging = Directory.CreateDirectory(Path.Combine(work, "staging")).FullName;
        var store = new FolderDatasetStore(Path.Combine(work, "store"));
        sw.Restart();
        using (var packer = new ShardPacker("train", seqLen + 1, tokenizer.VocabSize <= 65536 ? 2 : 4, 8192, staging))
        {
            foreach (var t in tokens)
                packer.Add(t);
            packer.Complete();
            foreach (var shard in packer.TakeFinished().ToList())
                await store.PutFileAsync(shard.LocalPath, $"bench/{shard.Entry.Path}", CancellationToken.None);
        }
        rows.Add(("pack + write (records, SHA-256, store)", mb / sw.Elapsed.TotalSeconds, sw.Elapsed.TotalSeconds, "folder store"));

        // The real pipeline end to end (it encodes on all cores; spool, two passes, manifest), for comparison.
        string input = Path.Combine(work, "input.txt");
        await File.WriteAllTextAsync(input, string.Join("\n\n", raw) + "\n");
        var preparer = new DatasetPreparer(new FolderDatasetStore(Path.Combine(work, "e2e")), Path.Combine(work, "e2e-work"));
        sw.Restart();
        await preparer.PrepareAsync(new PrepareSpec([new SourceSpec("kjv", input)], seqLen, vocab), null, CancellationToken.None);
        double e2e = sw.Elapsed.TotalSeconds;
        rows.Add(("whole prepare (all cores, incl. tokenizer training)", mb / e2e, e2e,
            $"{mb / e2e / Environment.ProcessorCount:F2} MB/s per core over {Environment.ProcessorCount} cores"));
        return rows;
    }

    // ---- Serving over loopback gRPC ----

    private static async Task ServingAsync(string work, int vocab, int seqLen, int batch, double seconds)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Benchmark" });
        builder.Configuration["DataShards:Root"] = Path.Combine(work, "serve-store");
        builder.Configuration["DataShards:WorkDir"] = Path.Combine(work, "serve-work");
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, o => o.Protocols = HttpProtocols.Http2));
        builder.AddDataShards();
        await using var app = builder.Build();
        app.MapDataShards();
        await app.StartAsync();
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        using var channel = GrpcChannel.ForAddress(address, new GrpcChannelOptions { MaxReceiveMessageSize = null });
        var client = new DataShards.DataShardsClient(channel);

        var request = new PrepareRequest { SeqLen = seqLen, VocabSize = vocab };
        request.Sources.Add(new Source { Name = "kjv", Path = Path.Combine(work, "input.txt") });
        var dataset = await client.PrepareAsync(request);
        long samples = dataset.TrainSamples;

        Console.WriteLine("| serving over loopback gRPC | samples/s | tokens/s | calls | note |");
        Console.WriteLine("|---|---|---|---|---|");
        foreach (int streams in new[] { 1, 4 })
        {
            await FetchAsync(client, dataset.DatasetId, 0, Math.Min(batch, (int)samples)); // warm: shards verified and open
            long served = 0, calls = 0;
            var sw = Stopwatch.StartNew();
            var until = TimeSpan.FromSeconds(seconds);
            await Task.WhenAll(Enumerable.Range(0, streams).Select(async s =>
            {
                long start = s * (long)batch;
                while (sw.Elapsed < until)
                {
                    long first = start % (samples - batch + 1); // stay inside epoch 0
                    int got = await FetchAsync(client, dataset.DatasetId, first, batch);
                    Interlocked.Add(ref served, got);
                    Interlocked.Increment(ref calls);
                    start += streams * (long)batch;
                }
            }));
            double elapsed = sw.Elapsed.TotalSeconds;
            Console.WriteLine($"| {streams} concurrent GetBatch stream(s), {batch} samples a call | {served / elapsed:F0} | " +
                              $"{served * (seqLen + 1) / elapsed:F0} | {calls} | {samples} train samples of {seqLen + 1} tokens |");
        }
        await app.StopAsync();
    }

    private static async Task<int> FetchAsync(DataShards.DataShardsClient client, string datasetId, long start, int count)
    {
        using var call = client.GetBatch(new GetBatchRequest { DatasetId = datasetId, Seed = 1, Start = start, Count = count });
        int n = 0;
        await foreach (var _ in call.ResponseStream.ReadAllAsync())
            n++;
        return n;
    }

    /// <summary>Wall seconds and process CPU seconds (all threads: GC and JIT included) of <paramref name="work"/>.</summary>
    private static (double Wall, double Cpu) Timed(Action work)
    {
        GC.Collect();
        var process = Process.GetCurrentProcess();
        var cpu0 = process.TotalProcessorTime;
        var sw = Stopwatch.StartNew();
        work();
        double wall = sw.Elapsed.TotalSeconds;
        process.Refresh();
        return (wall, (process.TotalProcessorTime - cpu0).TotalSeconds);
    }
}
