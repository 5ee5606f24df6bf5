// Training samples fetched from DataShardService by global index: only this rank's part of each step travels, in one
// call per step (the read-ahead) rather than one per micro-batch.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.Training.Data;
using Grpc.Core;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

public sealed class RemoteSampleSource : ISampleSource
{
    readonly DataShards.DataShardsClient client;
    readonly string dataset;
    readonly ulong seed;
    readonly int epochs;
    readonly string split;
    readonly int readAhead;
    long cachedStart = -1;
    long[] cached = [];
    int cachedCount;

    public int SeqLen { get; }
    public long SampleCount { get; }

    /// <param name="readAhead">
    /// Samples one call asks for when a fetch misses: the rank's share of a step, whose micro-batches the trainer then
    /// fetches in order. Each GetBatch call costs both processes CPU that a small step feels (the cluster bench measured
    /// ~11 ms of DataShardService CPU per call of 4 samples on the 2-core VM); 0 fetches exactly what is asked.
    /// </param>
    public RemoteSampleSource(DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long sampleCount, int epochs,
                              string split = "train", int readAhead = 0)
    {
        // At most ~4 M tokens held (32 MiB): a huge global batch of long sequences falls back to fetching less at a time.
        this.readAhead = Math.Clamp(readAhead, 0, Math.Max(1, (4 << 20) / (seqLen + 1)));
        this.split = split;
        this.client = client;
        this.dataset = dataset;
        this.seed = seed;
        this.epochs = Math.Max(1, epochs);
        SeqLen = seqLen;
        SampleCount = sampleCount;
    }

    /// <summary>Connects to the dataset and checks it fits the job (sequence length).</summary>
    public static async Task<RemoteSampleSource> OpenAsync(DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long totalSamples,
                                                           CancellationToken ct, string split = "train", int readAhead = 0)
    {
        var m = await client.GetManifestAsync(new GetManifestRequest { DatasetId = dataset }, cancellationToken: ct);
        if (m.SeqLen != seqLen)
            throw new InvalidDataException($"dataset {dataset} was packed with seq_len {m.SeqLen}, the job trains with {seqLen}");
        long samples = split == "validation" ? m.ValidationSamples : m.TrainSamples;
        if (samples == 0) throw new InvalidDataException($"dataset {dataset} has no {split} samples");
        int epochs = (int)Math.Max(1, (totalSamples + samples - 1) / samples);
        return new RemoteSampleSource(client, dataset, seed, seqLen, samples, epochs, split, readAhead);
    }

    public Tensor Fetch(long globalStart, int count)
    {
        int row = SeqLen + 1;
        if (cachedStart < 0 || globalStart < cachedStart || globalStart + count > cachedStart + cachedCount)
        {
            // A miss: this and the next samples up to the read-ahead, never past the last global index the job's epochs hold.
            long available = SampleCount * epochs - globalStart;
            int want = (int)Math.Min(Math.Max(count, readAhead), Math.Max(count, available));
            cached = Download(globalStart, want);
            cachedStart = globalStart;
            cachedCount = want;
        }
        var tokens = new long[count * row];
        Array.Copy(cached, (globalStart - cachedStart) * row, tokens, 0, tokens.Length);
        return tensor(tokens, [count, row], ScalarType.Int64);
    }

    long[] Download(long globalStart, int count)
    {
        var tokens = new long[count * (SeqLen + 1)];
        int row = 0;
        using var call = client.GetBatch(new GetBatchRequest { DatasetId = dataset, Split = split, Seed = seed, Start = globalStart, Count = count, Epochs = epochs });
        var stream = call.ResponseStream;
        while (stream.MoveNext(CancellationToken.None).GetAwaiter().GetResult())
        {
            var s = stream.Current;
            if (s.Tokens.Count != SeqLen + 1)
                throw new InvalidDataException($"dataset {dataset}: sample {s.GlobalIndex} has {s.Tokens.Count} tokens, expected {SeqLen + 1}");
            for (int i = 0; i < s.Tokens.Count; i++) tokens[row * (SeqLen + 1) + i] = s.Tokens[i];
            row++;
        }
        if (row != count) throw new InvalidDataException($"dataset {dataset}: asked for {count} samples from {globalStart}, got {row}");
        return tokens;
    }
}
