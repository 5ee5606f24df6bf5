// Continuous batching for one loaded model: admission, chunked prefill and batched decode on one engine thread.
// Not the HTTP API (Api/) and not the choice between model versions (Routing/).
using System.Collections.Concurrent;
using System.Diagnostics;
using DeepSeekCluster.ModelServer.Metrics;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Engine;

/// <summary>
/// Each engine step, in order: take new requests; drop cancelled ones (their blocks return to the pool at once);
/// admit waiting requests in arrival order while the batch has room and the pool holds their worst case
/// (prompt + max_tokens, so a running request never runs out of cache and nothing is preempted; the head of the
/// queue waits for blocks, and those behind it wait too, so no large request starves); prefill at most
/// <see cref="EngineOptions.PrefillTokensPerStep"/> prompt tokens, in chunks, oldest first (requests with as many tokens
/// left as the oldest one's chunk share its forward); then one decode step for
/// every running request together. A long prompt therefore delays a running stream by at most one chunk per token,
/// and a request admitted in this step decodes in the next.
/// </summary>
public sealed class InferenceEngine : IDisposable
{
    readonly DeepSeekForCausalLM model;
    readonly EngineOptions options;
    readonly ServingMetrics? metrics;
    readonly string version;
    readonly Device device;
    readonly ConcurrentQueue<GenerationRequest> incoming = new();
    readonly SemaphoreSlim wake = new(0);
    readonly List<GenerationRequest> waiting = [];
    readonly List<GenerationRequest> prefilling = [];
    readonly List<GenerationRequest> running = [];
    readonly Thread thread;
    readonly CancellationTokenSource stop = new();
    int queued;                                   // incoming + waiting: what MaxWaiting bounds
    readonly List<InferenceMoe> inferenceMoe;

    public InferenceEngine(DeepSeekForCausalLM model, EngineOptions options, string version, ServingMetrics? metrics = null)
    {
        this.model = model;
        this.options = options.Validated();
        this.version = version;
        this.metrics = metrics;
        var config = model.Config;
        device = model.lm_head.weight!.device;
        ContextLength = config.MaxPositionEmbeddings;
        int blockSize = options.BlockSize;
        int blocks = options.CacheBlocks > 0 ? options.CacheBlocks : options.MaxBatch * ((ContextLength + blockSize - 1) / blockSize);
        Pool = new LatentBlockPool(config.NumHiddenLayers, blocks, blockSize, config.KvLoraRank, config.QkRopeHeadDim, model.lm_head.weight!.dtype, device);
        model.eval();
        foreach (var layer in model.model.layers) layer.self_attn.AbsorbedDecode = options.AbsorbedDecode;
        inferenceMoe = InferenceMoe.Install(model);
        metrics?.Observe(this);
        thread = new Thread(Run) { IsBackground = true, Name = $"engine {version}" };
        thread.Start();
    }

    public string Version => version;
    public int ContextLength { get; }
    public int VocabSize => model.Config.VocabSize;
    public LatentBlockPool Pool { get; }
    public int Running => Volatile.Read(ref runningCount);
    public int Waiting => Volatile.Read(ref queued);
    int runningCount;

    /// <summary>Accepts a request, or returns false when the waiting queue is full (the API answers 429).</summary>
    public bool TryEnqueue(GenerationRequest request)
    {
        if (request.Prompt.Length >= ContextLength)
            throw new ArgumentException($"the prompt has {request.Prompt.Length} tokens; this model's context holds {ContextLength}, so at most {ContextLength - 1}");
        if (Pool.BlocksFor(Reservation(request)) > Pool.BlockCount)
            throw new ArgumentException($"prompt + max_tokens needs {Pool.BlocksFor(Reservation(request))} cache blocks; the pool has {Pool.BlockCount}");
        if (Interlocked.Increment(ref queued) > options.MaxWaiting + Math.Max(0, options.MaxBatch - Running))
        {
            Interlocked.Decrement(ref queued);
            return false;
        }
        incoming.Enqueue(request);
        wake.Release();
        return true;
    }

    /// <summary>Cache tokens a request may need: its prompt and every token it may still feed back.</summary>
    long Reservation(GenerationRequest r) => Math.Min(r.Prompt.Length + (long)r.MaxTokens, ContextLength);

    /// <summary>Tokens a request may generate: max_tokens, cut by the context (as TextGenerator stops at max_position_embeddings).</summary>
    int Allowed(GenerationRequest r) => (int)Math.Min(r.MaxTokens, ContextLength - r.Prompt.Length);

    void Run()
    {
        using var noGrad = no_grad();
        while (!stop.IsCancellationRequested)
        {
            if (waiting.Count + prefilling.Count + running.Count == 0 && incoming.IsEmpty)
            {
                try { wake.Wait(stop.Token); } catch (OperationCanceledException) { break; }
            }
            while (incoming.TryDequeue(out var r)) waiting.Add(r);
            DropCancelled();
            Admit();
            using var hold = FinalizerHold.Enter();
            Prefill();
            Decode();
        }
        // Stopping: whatever was accepted and not finished ends as cancelled, so no reader waits forever.
        while (incoming.TryDequeue(out var late)) waiting.Add(late);
        foreach (var r in waiting.Concat(prefilling).Concat(running).ToList()) Finish(r, "cancelled");
    }

    void DropCancelled()
    {
        foreach (var list in new[] { waiting, prefilling, running })
            for (int i = list.Count - 1; i >= 0; i--)
                if (list[i].Cancellation.IsCancellationRequested) Finish(list[i], "cancelled");
    }

    void Admit()
    {
        while (waiting.Count > 0 && prefilling.Count + running.Count < options.MaxBatch)
        {
            var r = waiting[0];
            var blocks = Pool.TryAllocate(Pool.BlocksFor(Reservation(r)));
            if (blocks is null) break; // the pool is full: wait for a running request to finish
            r.Blocks = blocks;
            waiting.RemoveAt(0);
            Interlocked.Decrement(ref queued);
            Interlocked.Increment(ref runningCount);
            prefilling.Add(r);
        }
    }

    void Prefill()
    {
        int budget = options.PrefillTokensPerStep;
        while (budget > 0 && prefilling.Count > 0)
        {
            // The oldest request sets the chunk; later ones with at least that many prompt tokens left join the same
            // (rows, chunk) forward while the budget lasts, so a burst of arrivals prefills in one pass, not one each.
            var head = prefilling[0];
            int chunk = (int)Math.Min(budget, head.Prompt.Length - head.Cached);
            var group = new List<GenerationRequest> { head };
            budget -= chunk;
            for (int i = 1; i < prefilling.Count && budget >= chunk; i++)
                if (prefilling[i].Prompt.Length - prefilling[i].Cached >= chunk)
                {
                    group.Add(prefilling[i]);
                    budget -= chunk;
                }
            try
            {
                using var scope = NewDisposeScope();
                var ids = tensor(group.SelectMany(r => r.Prompt.AsSpan((int)r.Cached, chunk).ToArray()).Select(t => (long)t).ToArray(), device: device)
                    .view(group.Count, chunk);
                using var batch = new PagedBatch(Pool, group.Select(r => r.Blocks!).ToList(), group.Select(r => r.Cached).ToArray(), chunk, device);
                var last_GV = model.Forward(ids, batch).Logits_BTV.select(1, chunk - 1).to_type(ScalarType.Float64).cpu();
                for (int g = 0; g < group.Count; g++)
                {
                    var r = group[g];
                    r.Cached += chunk;
                    if (r.Cached < r.Prompt.Length) continue; // more chunks next step
                    prefilling.Remove(r);
                    running.Add(r);
                    metrics?.PromptTokens(version, r.Prompt.Length);
                    Emit(r, last_GV[g]);
                }
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                foreach (var r in group) Fail(r, e);
            }
        }
    }

    void Decode()
    {
        var rows = running.Where(r => r.Pending >= 0).ToList();
        if (rows.Count == 0) return;
        try
        {
            using var scope = NewDisposeScope();
            var ids = tensor(rows.Select(r => (long)r.Pending).ToArray(), device: device).view(rows.Count, 1);
            using var batch = new PagedBatch(Pool, rows.Select(r => r.Blocks!).ToList(), rows.Select(r => r.Cached).ToArray(), 1, device);
            var logits_BV = model.Forward(ids, batch).Logits_BTV.select(1, 0).to_type(ScalarType.Float64).cpu();
            for (int b = 0; b < rows.Count; b++)
            {
                rows[b].Cached += 1;
                Emit(rows[b], logits_BV[b]);
            }
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            foreach (var r in rows) Fail(r, e);
        }
    }

    /// <summary>Samples the request's next token from its float64 logits (V) and streams it, or finishes the request.</summary>
    void Emit(GenerationRequest r, Tensor logits_V)
    {
        var choose_V = logits_V;
        if (r.LogitBias.Count > 0)
        {
            choose_V = logits_V.clone();
            foreach (var (token, bias) in r.LogitBias) choose_V[token] += bias;
        }
        int next = r.Sampling.Greedy ? (int)choose_V.argmax().item<long>() : TextGenerator.Sample(choose_V, r.Sampling, r.Generator);
        long now = Stopwatch.GetTimestamp();
        if (r.Produced == 0) r.FirstTokenAt = now;
        if (r.Produced == 0) metrics?.FirstToken(version, Stopwatch.GetElapsedTime(r.EnqueuedAt, now).TotalSeconds);
        else metrics?.NextToken(version, Stopwatch.GetElapsedTime(r.LastTokenAt, now).TotalSeconds);
        r.LastTokenAt = now;
        if (next == r.EosTokenId) { Finish(r, "stop"); return; }
        double logprob = 0;
        List<(int, double)>? top = null;
        if (r.TopLogprobs >= 0)
        {
            var logp_V = logits_V.log_softmax(-1);
            logprob = logp_V[next].item<double>();
            if (r.TopLogprobs > 0)
            {
                var (values, indices) = logp_V.topk(Math.Min(r.TopLogprobs, (int)logp_V.shape[0]));
                top = [];
                for (int i = 0; i < values.shape[0]; i++) top.Add(((int)indices[i].item<long>(), values[i].item<double>()));
            }
        }
        r.Produced++;
        r.Pending = next;
        metrics?.OutputTokens(version, 1);
        r.Events.Writer.TryWrite(new TokenEvent(next, logprob, top));
        if (r.Produced >= Allowed(r)) Finish(r, "length");
    }

    void Finish(GenerationRequest r, string reason)
    {
        Remove(r);
        r.Events.Writer.TryWrite(new FinishedEvent(reason));
        r.Events.Writer.TryComplete();
    }

    void Fail(GenerationRequest r, Exception e)
    {
        Remove(r);
        r.Events.Writer.TryWrite(new FailedEvent(e));
        r.Events.Writer.TryComplete();
    }

    void Remove(GenerationRequest r)
    {
        r.FinishedAt = Stopwatch.GetTimestamp();
        if (waiting.Remove(r)) Interlocked.Decrement(ref queued);
        if (prefilling.Remove(r) | running.Remove(r)) Interlocked.Decrement(ref runningCount);
        if (r.Blocks is { } blocks) { Pool.Release(blocks); r.Blocks = null; }
        r.Pending = -1;
    }

    int disposed;

    public void Dispose()
    {
        if (Interlocked.Exchange(ref disposed, 1) == 1) return;
        stop.Cancel();
        wake.Release();
        thread.Join();
        metrics?.Forget(this);
        Pool.Dispose();
        model.Dispose();
        foreach (var m in inferenceMoe) m.Dispose();
        stop.Dispose();
        wake.Dispose();
    }
}
