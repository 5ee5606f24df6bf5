// One accepted request from enqueue to its last token: events from the engine become text deltas; a stop string or a
// gone client cancels the engine's work at once. Shared by /v1/completions and /v1/chat/completions.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.ModelServer.Api;

/// <param name="FinishReason">"stop" or "length", as OpenAI names them.</param>
public sealed record RunResult(string FinishReason, int CompletionTokens, IReadOnlyList<int> TokenIds);

public static class GenerationRun
{
    /// <summary>Tokens of a prompt given as text, as <c>gpu-worker generate</c> encodes it (special tokens added; BOS when empty).</summary>
    public static int[] Encode(ServedModel served, string text, string param)
    {
        if (served.Tokenizer is null)
            throw ApiError.BadRequest($"model version '{served.Version}' has no tokenizer.json: give '{param}' as an array of token ids", param);
        var ids = served.Tokenizer.Encode(text, addSpecialTokens: true);
        return ids.Length > 0 ? ids : served.BosTokenId is int bos ? [bos] : throw ApiError.BadRequest($"'{param}' is empty and the model has no BOS token", param);
    }

    /// <summary>
    /// Runs the request; <paramref name="onToken"/> gets each token's released text (possibly empty) and the token,
    /// then once more with the remaining text and no token. Throws <see cref="ApiError"/> 400/429 before anything is
    /// generated, <see cref="OperationCanceledException"/> when the client went away.
    /// </summary>
    public static async Task<RunResult> ExecuteAsync(ServedModel served, int[] prompt, GenerationParameters p, int topLogprobs,
        Func<string, TokenEvent?, Task> onToken, CancellationToken aborted)
    {
        var engine = served.Engine;
        int vocab = served.Engine.VocabSize;
        if (prompt.FirstOrDefault(t => t < 0 || t >= vocab, -1) is var bad && bad != -1)
            throw ApiError.BadRequest($"prompt token {bad} is outside the vocabulary (0..{vocab - 1})", "prompt");
        if (prompt.Length >= engine.ContextLength)
            throw ApiError.BadRequest($"the prompt has {prompt.Length} tokens; this model's context holds {engine.ContextLength}, so at most {engine.ContextLength - 1}", "prompt");
        if (p.LogitBias.Keys.FirstOrDefault(t => t >= vocab, -1) is var biased && biased != -1)
            throw ApiError.BadRequest($"'logit_bias' names token {biased}, outside the vocabulary (0..{vocab - 1})", "logit_bias");
        int maxTokens = Math.Min(p.MaxTokens, engine.ContextLength - prompt.Length);
        var sampling = new SamplingOptions { MaxNewTokens = maxTokens, Temperature = p.Temperature, TopP = p.TopP, Seed = p.Seed };
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(aborted);
        var request = new GenerationRequest(prompt, maxTokens, sampling, topLogprobs, served.EosTokenId, cancel.Token) { LogitBias = p.LogitBias };
        bool accepted;
        try { accepted = engine.TryEnqueue(request); }
        catch (ArgumentException e) { throw ApiError.BadRequest(e.Message, "max_tokens"); }
        if (!accepted)
            throw ApiError.Overloaded($"model version '{served.Version}' has {engine.Waiting} requests waiting, its limit; retry after the Retry-After seconds", retryAfter: 1);

        var text = new TextAssembler(served.Tokenizer, p.Stop);
        string reason = "length";
        try
        {
            await foreach (var ev in request.Events.Reader.ReadAllAsync(CancellationToken.None))
            {
                switch (ev)
                {
                    case TokenEvent token:
                        var delta = text.Add(token.Token);
                        await onToken(delta, token);
                        if (text.Stopped)
                        {
                            reason = "stop";
                            await cancel.CancelAsync(); // frees the request's batch slot and cache blocks at the next step
                            goto done;
                        }
                        break;
                    case FinishedEvent f when f.Reason == "cancelled":
                        aborted.ThrowIfCancellationRequested();
                        throw new InvalidOperationException($"model version '{served.Version}' stopped before the request finished (the server is shutting down)");
                    case FinishedEvent f:
                        reason = f.Reason;
                        break;
                    case FailedEvent failed:
                        throw new InvalidOperationException($"generation failed in model version '{served.Version}': {failed.Error.Message}", failed.Error);
                }
            }
        done:
            await onToken(text.Flush(), null);
        }
        catch
        {
            await cancel.CancelAsync(); // a client gone mid-stream frees its slot now, not at max_tokens
            throw;
        }
        return new RunResult(reason, text.Ids.Count, text.Ids);
    }
}
