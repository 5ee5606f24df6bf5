// gRPC DataShards: Prepare, GetManifest, GetBatch. Maps DataInputException kinds to status codes; messages pass through.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Metrics;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.Text.Data;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Serving;

public sealed class DataShardsService(DatasetPreparer preparer, DatasetCatalog catalog, DataShardsMetrics metrics, ILogger<DataShardsService> log)
    : DataShards.DataShardsBase
{
    private const int MaxBatch = 65536;

    public override Task<PrepareReply> Prepare(PrepareRequest request, ServerCallContext context) => Guard(async () =>
    {
        var progress = new Progress<string>(line => log.LogInformation("prepare: {Line}", line));
        var result = await preparer.PrepareAsync(ToSpec(request), progress, context.CancellationToken);
        var m = result.Manifest;
        return new PrepareReply
        {
            DatasetId = m.DatasetId,
            Reused = result.Reused,
            ReportJson = System.Text.Json.JsonSerializer.Serialize(m.Report, DatasetManifest.Json),
            TrainSamples = m.Splits[DatasetPreparer.TrainSplit].Samples,
            ValidationSamples = m.Splits[DatasetPreparer.ValidationSplit].Samples,
        };
    });

    public override Task<GetManifestReply> GetManifest(GetManifestRequest request, ServerCallContext context) => Guard(async () =>
    {
        var m = (await catalog.OpenAsync(request.DatasetId, context.CancellationToken)).Manifest;
        return new GetManifestReply
        {
            ManifestJson = m.ToJson(),
            DatasetId = m.DatasetId,
            TokenizerHash = m.TokenizerHash,
            SeqLen = m.SeqLen,
            VocabSize = m.VocabSize,
            TrainSamples = m.Splits[DatasetPreparer.TrainSplit].Samples,
            ValidationSamples = m.Splits[DatasetPreparer.ValidationSplit].Samples,
        };
    });

    public override Task<GetTokenizerReply> GetTokenizer(GetManifestRequest request, ServerCallContext context) => Guard(async () =>
    {
        var m = (await catalog.OpenAsync(request.DatasetId, context.CancellationToken)).Manifest;
        return new GetTokenizerReply
        {
            TokenizerJson = await catalog.ReadTokenizerAsync(request.DatasetId, context.CancellationToken),
            TokenizerHash = m.TokenizerHash,
            EotTokenId = m.EotTokenId,
        };
    });

    public override Task GetBatch(GetBatchRequest request, IServerStreamWriter<Sample> responseStream, ServerCallContext context) => Guard(async () =>
    {
        var ct = context.CancellationToken;
        var dataset = await catalog.OpenAsync(request.DatasetId, ct);
        string split = string.IsNullOrEmpty(request.Split) ? DatasetPreparer.TrainSplit : request.Split;
        long samples = dataset.Split(split).Samples;
        int epochs = request.Epochs == 0 ? 1 : request.Epochs;
        if (request.Count < 1 || request.Count > MaxBatch)
            throw DataInputException.Invalid($"count is {request.Count}: expected 1 to {MaxBatch} samples per call.");
        if (request.Start < 0 || epochs < 1)
            throw DataInputException.Invalid($"start is {request.Start} and epochs {request.Epochs}: expected start >= 0 and epochs >= 0.");
        long end = request.Start + request.Count;
        if (samples == 0 || end > samples * epochs)
            throw new DataInputException(DataErrorKind.OutOfRange,
                $"Samples [{request.Start}, {end}) run past the end of split '{split}' of dataset '{request.DatasetId}': " +
                $"it has {samples} samples × {epochs} epoch(s) = {samples * epochs} global indices.");

        var permutation = new SamplePermutation(samples, request.Seed);
        for (long g = request.Start; g < end; g++)
        {
            long index = permutation.SampleAt(g);
            var tokens = new uint[dataset.Manifest.SampleTokens];
            await dataset.ReadSampleAsync(split, index, tokens, ct);
            var sample = new Sample { GlobalIndex = g, SampleIndex = index };
            sample.Tokens.AddRange(tokens);
            await responseStream.WriteAsync(sample, ct);
            metrics.SamplesServed(1, dataset.Manifest.RecordBytes);
        }
        return true;
    });

    internal static PrepareSpec ToSpec(PrepareRequest r)
    {
        var c = r.Cleaning ?? new CleaningOptions();
        var d = r.Dedup ?? new DedupOptions();
        var defaults = new PrepareSpec([], 1);
        var cleaning = new CleaningSpec();
        var dedup = new DedupSpec();
        return new PrepareSpec(
            r.Sources.Select(s => new SourceSpec(s.Name, s.Path, s.Weight == 0 ? 1.0 : s.Weight,
                string.IsNullOrEmpty(s.TextField) ? "text" : s.TextField, s.WholeFile)).ToList(),
            r.SeqLen,
            r.VocabSize == 0 ? defaults.VocabSize : r.VocabSize,
            string.IsNullOrEmpty(r.TokenizerPath) ? null : r.TokenizerPath,
            r.ValidationFraction == 0 ? defaults.ValidationFraction : Math.Max(0, r.ValidationFraction),
            r.SamplesPerShard == 0 ? defaults.SamplesPerShard : r.SamplesPerShard,
            new CleaningSpec(
                c.HasMinChars ? c.MinChars : cleaning.MinChars,
                c.HasMaxChars ? c.MaxChars : cleaning.MaxChars,
                c.HasMinAlphabeticFraction ? c.MinAlphabeticFraction : cleaning.MinAlphabeticFraction,
                c.HasMaxRepeatedLineFraction ? c.MaxRepeatedLineFraction : cleaning.MaxRepeatedLineFraction,
                c.HasDuplicateNgramWords ? c.DuplicateNgramWords : cleaning.DuplicateNGramWords,
                c.HasMaxDuplicateNgramFraction ? c.MaxDuplicateNgramFraction : cleaning.MaxDuplicateNGramFraction),
            new DedupSpec(
                !d.DisableNearDuplicates,
                d.HasShingleWords ? d.ShingleWords : dedup.ShingleWords,
                d.HasPermutations ? d.Permutations : dedup.Permutations,
                d.HasBands ? d.Bands : dedup.Bands,
                d.HasThreshold ? d.Threshold : dedup.Threshold));
    }

    private static async Task<T> Guard<T>(Func<Task<T>> call)
    {
        try
        {
            return await call();
        }
        catch (DataInputException e)
        {
            var code = e.Kind switch
            {
                DataErrorKind.NotFound => StatusCode.NotFound,
                DataErrorKind.OutOfRange => StatusCode.OutOfRange,
                DataErrorKind.Corrupt => StatusCode.DataLoss,
                DataErrorKind.Unavailable => StatusCode.Unavailable,
                _ => StatusCode.InvalidArgument,
            };
            throw new RpcException(new Status(code, e.Message));
        }
    }
}
