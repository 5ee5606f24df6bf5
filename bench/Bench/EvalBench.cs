// Evaluation throughput: input tokens scored per second by 1 and N workers, each a thread of this process with its own
// copy of the model and a rank of a real tcp ring (the cluster's exchange of scores included).
using System.Diagnostics;
using System.Net;
using DeepSeekCluster.Text.Data;
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class EvalBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("eval", args);
        var taskNames = o.List("--tasks", "kjv_nextverse,kjv_cloze,kjv_heldout");
        int limit = o.Int("--limit", 200, 1);
        var workers = o.Ints("--workers", "1,2", 1).ToList();
        int maxLength = o.Int("--max-length", 128, 1), batch = o.Int("--batch-size", 16, 1);
        string? modelDir = o.Optional("--model");
        var deviceName = o.String("--device", "cpu");
        o.Done();
        var tasks = taskNames.Select(n => EvalTask.Resolve(n).Limited(limit)).ToList();
        var device = DeepSeekCluster.Training.Engine.StandaloneRun.ResolveDevice(deviceName);
        // A model folder's weights and tokenizer, or the tiny preset with a tokenizer trained on the held-out chapters
        // (the rate does not depend on the weights' values).
        var tokenizer = modelDir is not null ? BpeTokenizer.Load(Path.Combine(modelDir, HfModelFolder.TokenizerFile))
            : BpeTokenizer.Train(TaskMaker.HeldOutChapters(ShippedCorpus.Documents()), 2048);
        DeepSeekForCausalLM NewModel()
        {
            if (modelDir is not null) return HfModelFolder.Load(modelDir, device).Model;
            manual_seed(1);
            var model = new DeepSeekForCausalLM(DeepSeekConfig.Tiny(tokenizer.VocabSize)).InitializeWeights();
            model.to(device);
            return model;
        }
        var plan = EvalPlan.Build(tasks, s => tokenizer.Encode(s), ModelEvaluation.PrefixToken(tokenizer, "bench"), maxLength, batch);
        Console.WriteLine($"# Evaluation throughput — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}, load {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
        Console.WriteLine($"{(modelDir ?? "tiny preset")} on {device}; {string.Join(", ", tasks.Select(t => $"{t.Name} x {t.Examples.Count}"))}: {plan.Requests.Count} requests in {plan.Batches.Count} batches of up to {batch}, window {maxLength}");
        Console.WriteLine();
        Console.WriteLine("| workers | tokens scored | wall s | tokens/s | per worker tokens/s |");
        Console.WriteLine("|---|---|---|---|---|");
        foreach (int n in workers)
        {
            var models = Enumerable.Range(0, n).Select(_ => NewModel()).ToArray();
            foreach (var m in models) new ModelScorer(m, device, maxLength).Score(plan.Requests.Take(2).ToList()); // first-call costs outside the clock
            var linkKey = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32); // one generation's key, shared by its ranks
            var rendezvous = Enumerable.Range(0, n).Select(r => new TcpRendezvous("bench-eval", 1, linkKey, r, n, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
            var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
            var clock = Stopwatch.StartNew();
            var tokens = rendezvous.Select((rv, rank) => Task.Factory.StartNew(() =>
            {
                using var ring = rv.Connect(endpoints, new TcpCollectiveOptions { Timeout = TimeSpan.FromMinutes(10) });
                var scorer = new ModelScorer(models[rank], device, maxLength);
                var (first, count) = plan.Share(rank, n);
                ScoreExchange.AllGather(plan, plan.ScoreBatches(scorer, first, count), ring);
                return scorer.TokensScored;
            }, TaskCreationOptions.LongRunning)).ToArray();
            Task.WaitAll(tokens);
            double seconds = clock.Elapsed.TotalSeconds;
            long total = tokens.Sum(t => t.Result);
            Console.WriteLine($"| {n} | {total:N0} | {seconds:F1} | {total / seconds:F0} | {string.Join(" / ", tokens.Select(t => $"{t.Result / seconds:F0}"))} |");
            foreach (var m in models) m.Dispose();
        }
    }
}
