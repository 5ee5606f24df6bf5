// Training samples fetched from DataShardService by global index: only this rank's part of each step travels.
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

    public int SeqLen { get; }
    public long SampleCount { get; }

    public RemoteSampleSource(DataShards.DataShardsClient client, string dataset, ulong seed, int seqLen, long sampleCount, int epochs, string split = "train")
    {
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
                                                           CancellationToken ct, string split = "train")
    {
        var m = await client.GetManifestAsync(new GetManifestRequest { DatasetId = dataset }, cancellationToken: ct);
        if (m.SeqLen != seqLen)
            throw new InvalidDataException($"dataset {dataset} was packed with seq_len {m.SeqLen}, the job trains with {seqLen}");
        long samples = split == "validation" ? m.ValidationSamples : m.TrainSamples;
        if (samples == 0) throw new InvalidDataException($"dataset {dataset} has no {split} samples");
        int epochs = (int)Math.Max(1, (totalSamples + samples - 1) / samples);
        return new RemoteSampleSource(client, dataset, seed, seqLen, samples, epochs, split);
    }

    public Tensor Fetch(long globalStart, int count)
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
        return tensor(tokens, [count, SeqLen + 1], ScalarType.Int64);
    }
}
