// Serving through the real gRPC service, on both backends: exactly-once per epoch for any world size, O(1) reads that
// match the shards, and the samples-served counters.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;
using DeepSeekCluster.Text.Data;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class FolderServingTests(FolderPreparedDataset fixture) : ServingBehaviour(fixture), IClassFixture<FolderPreparedDataset>;

public sealed class AzuriteServingTests(AzuritePreparedDataset fixture) : ServingBehaviour(fixture), IClassFixture<AzuritePreparedDataset>;

public abstract class ServingBehaviour(PreparedDatasetFixture fixture)
{
    private const ulong Seed = 1234;

    [Fact]
    public void TheFixtureDatasetHasSeveralShardsAndBothSplits()
    {
        var train = fixture.Manifest.Splits[DatasetPreparer.TrainSplit];
        Assert.True(train.Shards.Count >= 3, $"expected several shards, got {train.Shards.Count}");
        Assert.True(fixture.Manifest.Splits[DatasetPreparer.ValidationSplit].Samples > 0);
        Assert.Equal("uint16", fixture.Manifest.TokenType);
        Assert.Equal(33, fixture.Manifest.SampleTokens);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(5)]
    public async Task EveryWorldSizeSeesEachSampleExactlyOncePerEpoch(int worldSize)
    {
        const int globalBatch = 30; // divisible by 1, 2, 3 and 5
        var records = await fixture.ReadSplitDirectlyAsync(DatasetPreparer.TrainSplit);
        long n = records.Length;
        var permutation = new SamplePermutation(n, Seed);
        var seen = new int[n];
        long steps = (n + globalBatch - 1) / globalBatch;
        for (long step = 0; step < steps; step++)
        {
            for (int rank = 0; rank < worldSize; rank++)
            {
                int perRank = globalBatch / worldSize;
                long first = step * globalBatch + (long)rank * perRank;
                long end = Math.Min(first + perRank, n); // the epoch ends inside the last step
                if (first >= end)
                    continue;
                var expected = permutation.Slice(step, globalBatch, rank, worldSize);
                var samples = await FetchAsync(first, (int)(end - first));
                for (int i = 0; i < samples.Count; i++)
                {
                    Assert.Equal(first + i, samples[i].GlobalIndex);
                    Assert.Equal(expected[i], samples[i].SampleIndex); // trainers computing the slice locally agree
                    Assert.Equal(records[samples[i].SampleIndex], samples[i].Tokens.ToArray());
                    seen[samples[i].SampleIndex]++;
                }
            }
        }
        Assert.All(seen, count => Assert.Equal(1, count));
    }

    [Fact]
    public async Task TheTokenizerTravelsWithTheDatasetAndDecodesItsSamples()
    {
        var reply = await fixture.Host.Client.GetTokenizerAsync(new GetManifestRequest { DatasetId = fixture.DatasetId });
        var tokenizer = DeepSeekCluster.Text.Tokenization.BpeTokenizer.FromJson(reply.TokenizerJson, "GetTokenizer");
        Assert.Equal(reply.TokenizerHash, tokenizer.Hash);
        Assert.Equal(tokenizer.EosTokenId, reply.EotTokenId);
        using var call = fixture.Host.Client.GetBatch(new GetBatchRequest { DatasetId = fixture.DatasetId, Count = 1 });
        Assert.True(await call.ResponseStream.MoveNext(CancellationToken.None));
        var text = tokenizer.Decode(call.ResponseStream.Current.Tokens.Select(t => (int)t));
        Assert.Contains(" ", text); // real words from the corpus, not noise
    }

    [Fact]
    public async Task TheSecondEpochIsADifferentOrderOfTheSameSamples()
    {
        long n = fixture.Manifest.Splits[DatasetPreparer.TrainSplit].Samples;
        var samples = await FetchAsync(n, (int)n, epochs: 2);
        var firstEpoch = await FetchAsync(0, (int)n);
        Assert.Equal(Enumerable.Range(0, (int)n).Select(i => (long)i), samples.Select(s => s.SampleIndex).Order());
        Assert.NotEqual(firstEpoch.Select(s => s.SampleIndex), samples.Select(s => s.SampleIndex));
    }

    [Fact]
    public async Task ARequestPastTheEndIsRefusedNamingTheDataset()
    {
        long n = fixture.Manifest.Splits[DatasetPreparer.TrainSplit].Samples;
        var e = await Assert.ThrowsAsync<RpcException>(() => FetchAsync(n - 2, 5));
        Assert.Equal(StatusCode.OutOfRange, e.StatusCode);
        Assert.Contains(fixture.DatasetId, e.Status.Detail);
    }

    [Fact]
    public async Task AnUnknownDatasetIsNotFoundNamingIt()
    {
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
            await fixture.Host.Client.GetManifestAsync(new GetManifestRequest { DatasetId = "ds-doesnotexist00" }));
        Assert.Equal(StatusCode.NotFound, e.StatusCode);
        Assert.Contains("ds-doesnotexist00", e.Status.Detail);

        var batch = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            using var call = fixture.Host.Client.GetBatch(new GetBatchRequest { DatasetId = "ds-doesnotexist00", Count = 1 });
            await call.ResponseStream.MoveNext();
        });
        Assert.Equal(StatusCode.NotFound, batch.StatusCode);
    }

    [Fact]
    public async Task PreparingTheSameInputsAgainReusesTheDataset()
    {
        var reply = await fixture.Host.Client.PrepareAsync(TestCorpus.Request(32, 300, 400,
            new Source { Name = "bible", Path = fixture.InputFolder }));
        Assert.True(reply.Reused);
        Assert.Equal(fixture.DatasetId, reply.DatasetId);
    }

    [Fact]
    public async Task ServingNSamplesAddsNToTheSamplesServedAndTheirBytesToTheBytesServedCounter()
    {
        using var metrics = new MetricRecorder(fixture.Host);
        var samples = await FetchAsync(5, 37);
        Assert.Equal(37, samples.Count);
        Assert.Equal(37, metrics.Sum("deepseek.data.samples_served"));
        Assert.Equal(37 * fixture.Manifest.RecordBytes, metrics.Sum("deepseek.data.bytes_served"));
    }

    [Fact]
    public async Task ARestartedServiceServesTheSameSamplesForTheSameSeedAndPositions()
    {
        long n = fixture.Manifest.Splits[DatasetPreparer.TrainSplit].Samples;
        var before = await FetchAsync(n - 7, 12, epochs: 2, client: fixture.Host.Client); // across the epoch boundary
        await using var restarted = await ServiceHost.StartAsync(fixture.Store);       // a fresh service instance (new catalog) on the same store
        var after = await FetchAsync(n - 7, 12, epochs: 2, client: restarted.Client);
        Assert.Equal(before.Select(s => (s.GlobalIndex, s.SampleIndex)), after.Select(s => (s.GlobalIndex, s.SampleIndex)));
        Assert.Equal(before.Select(s => s.Tokens.ToArray()), after.Select(s => s.Tokens.ToArray()));
    }

    private async Task<List<Sample>> FetchAsync(long start, int count, int epochs = 1, DataShards.DataShardsClient? client = null)
    {
        using var call = (client ?? fixture.Host.Client).GetBatch(new GetBatchRequest
        {
            DatasetId = fixture.DatasetId,
            Seed = Seed,
            Start = start,
            Count = count,
            Epochs = epochs,
        });
        var samples = new List<Sample>();
        await foreach (var s in call.ResponseStream.ReadAllAsync())
            samples.Add(s);
        return samples;
    }
}
