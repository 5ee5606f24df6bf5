// The engine without HTTP: continuous batching gives each request what it would get alone, the pool bounds memory.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.ModelServer.Tests;

public class EngineTests
{
    static int[][] Prompts(int count, int vocab, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(i => Enumerable.Range(0, 1 + random.Next(20)).Select(_ => random.Next(3, vocab)).ToArray()).ToArray();
    }

    static async Task<int[]> Collect(GenerationRequest request)
    {
        var tokens = new List<int>();
        await foreach (var ev in request.Events.Reader.ReadAllAsync())
            if (ev is TokenEvent t) tokens.Add(t.Token);
            else if (ev is FailedEvent f) throw new InvalidOperationException("generation failed", f.Error);
        return tokens.ToArray();
    }

    static int[] Alone(string dir, int[] prompt, SamplingOptions sampling)
    {
        using var model = HfModelFolder.Load(dir).Model;
        return TextGenerator.Generate(model, prompt, sampling);
    }

    [Theory]
    [InlineData(0.0)]   // greedy
    [InlineData(0.9)]   // seeded sampling draws the same tokens from the same distributions
    public async Task BatchedDecodeEqualsSingleSequenceDecodeTokenForToken(double temperature)
    {
        var dir = ModelFolders.Get(1);
        var loaded = HfModelFolder.Load(dir);
        var prompts = Prompts(6, loaded.Model.Config.VocabSize, seed: 7);
        var sampling = prompts.Select((_, i) => new SamplingOptions { MaxNewTokens = 20, Temperature = temperature, TopP = 0.9, Seed = 100 + i }).ToArray();
        var alone = prompts.Select((p, i) => Alone(dir, p, sampling[i])).ToArray();

        // Small prefill chunks and blocks: prompts are split over steps and rows span several blocks.
        using var engine = new InferenceEngine(loaded.Model, new EngineOptions { MaxBatch = 8, BlockSize = 4, PrefillTokensPerStep = 5 }, "v1");
        var requests = prompts.Select((p, i) => new GenerationRequest(p, 20, sampling[i], -1, null, CancellationToken.None)).ToArray();
        // Half start together; the rest join a batch that is already decoding.
        foreach (var r in requests.Take(3)) Assert.True(engine.TryEnqueue(r));
        await requests[0].Events.Reader.WaitToReadAsync();
        foreach (var r in requests.Skip(3)) Assert.True(engine.TryEnqueue(r));
        var batched = await Task.WhenAll(requests.Select(Collect));

        for (int i = 0; i < prompts.Length; i++) Assert.Equal(alone[i], batched[i]);
        Assert.True(requests[3].FirstTokenAt < requests[0].FinishedAt, "a late request joins while the first still decodes");
        Assert.Equal(0, engine.Pool.BlocksInUse);
    }

    [Fact]
    public async Task WhenThePoolIsFullRequestsWaitAndThenRun()
    {
        var dir = ModelFolders.Get(1);
        var loaded = HfModelFolder.Load(dir);
        var prompts = Prompts(3, loaded.Model.Config.VocabSize, seed: 8).Select(p => p.Take(6).ToArray()).ToArray();
        var greedy = new SamplingOptions { MaxNewTokens = 10 };
        // prompt (<= 6) + 10 tokens need at most 4 blocks of 4: a pool of 5 holds one request at a time.
        using var engine = new InferenceEngine(loaded.Model, new EngineOptions { MaxBatch = 8, BlockSize = 4, CacheBlocks = 5 }, "v1");
        var requests = prompts.Select(p => new GenerationRequest(p, 10, greedy, -1, null, CancellationToken.None)).ToArray();
        foreach (var r in requests) Assert.True(engine.TryEnqueue(r));
        var outputs = await Task.WhenAll(requests.Select(Collect));

        for (int i = 0; i < prompts.Length; i++) Assert.Equal(Alone(dir, prompts[i], greedy), outputs[i]);
        var order = requests.OrderBy(r => r.FirstTokenAt).ToArray();
        Assert.True(order[1].FirstTokenAt > order[0].FinishedAt && order[2].FirstTokenAt > order[1].FinishedAt,
            "each request started only after the one holding the blocks had finished");
        Assert.Equal(0, engine.Pool.BlocksInUse);
    }

    [Fact]
    public async Task ACancelledRequestFreesItsBlocksAndTheOthersGoOn()
    {
        var loaded = HfModelFolder.Load(ModelFolders.Get(1));
        using var engine = new InferenceEngine(loaded.Model, new EngineOptions { MaxBatch = 4, BlockSize = 4 }, "v1");
        using var cancel = new CancellationTokenSource();
        var doomed = new GenerationRequest([5, 6, 7], 100, new SamplingOptions(), -1, null, cancel.Token);
        var other = new GenerationRequest([8, 9], 30, new SamplingOptions(), -1, null, CancellationToken.None);
        Assert.True(engine.TryEnqueue(doomed));
        Assert.True(engine.TryEnqueue(other));
        Assert.True(await doomed.Events.Reader.WaitToReadAsync());
        cancel.Cancel();
        var events = new List<GenerationEvent>();
        await foreach (var ev in doomed.Events.Reader.ReadAllAsync()) events.Add(ev);
        Assert.Equal(new FinishedEvent("cancelled"), events[^1]);
        Assert.True(events.Count(e => e is TokenEvent) < 100);
        Assert.Equal(30, (await Collect(other)).Length);
        Assert.Equal(0, engine.Pool.BlocksInUse);
    }

    [Fact]
    public void RequestsTheContextOrThePoolCannotHoldAreRefusedWithTheirSizes()
    {
        var loaded = HfModelFolder.Load(ModelFolders.Get(1));
        using var engine = new InferenceEngine(loaded.Model, new EngineOptions { MaxBatch = 2, BlockSize = 4, CacheBlocks = 3 }, "v1");
        var tooLong = new GenerationRequest(new int[128], 1, new SamplingOptions(), -1, null, CancellationToken.None);
        Assert.Contains("context holds 128", Assert.Throws<ArgumentException>(() => engine.TryEnqueue(tooLong)).Message);
        var tooBig = new GenerationRequest(new int[10], 10, new SamplingOptions(), -1, null, CancellationToken.None);
        Assert.Contains("the pool has 3", Assert.Throws<ArgumentException>(() => engine.TryEnqueue(tooBig)).Message);
    }
}
