// bench: performance measurements, one verb per part. Run with -c Release; results go to stdout as markdown.
using DeepSeekCluster.Bench;

const string Verbs = "train, checkpoint, redundancy, data, collectives, ep, zero3, dp-overlap, exact-sum, optimizer-phase, kernels, precision-parts, recompute, export, eval, soak, recovery, cluster, scheduling";
if (args is ["--help" or "-h" or "help", ..])
{
    Console.WriteLine($"usage: bench VERB [--option value ...]   (no verb: train)\nverbs: {Verbs}\n" +
                      "bench VERB --help lists the options a verb reads and their defaults; --dry-run prints the values a run would use and exits.");
    return 0;
}
var verb = args.FirstOrDefault() is { } first && !first.StartsWith("--", StringComparison.Ordinal) ? first : "train";
var rest = verb == args.FirstOrDefault() ? args[1..] : args;
try
{
    switch (verb)
    {
        case "train": TrainingBench.Run(rest); break;
        case "checkpoint": CheckpointBench.Run(rest); break;
        case "data": DataBench.Run(rest); break;
        case "collectives": CollectiveBench.Run(rest); break;
        case "ep": ExpertBench.Run(rest); break;
        case "zero3": Zero3Bench.Run(rest); break;
        case "redundancy": RedundancyBench.Run(rest); break;
        case "dp-overlap": DpOverlapBench.Run(rest); break;
        case "exact-sum": ExactSumBench.Run(rest); break;
        case "optimizer-phase": OptimizerPhaseBench.Run(rest); break;
        case "kernels": KernelBench.Run(rest); break;
        case "precision-parts": PrecisionPartsBench.Run(rest); break;
        case "recompute": RecomputeBench.Run(rest); break;
        case "export": ExportBench.Run(rest); break;
        case "eval": EvalBench.Run(rest); break;
        case "soak": return await SoakBench.RunAsync(rest);
        case "recovery": return await RecoveryBench.RunAsync(rest);
        case "cluster": return await ClusterBench.RunAsync(rest);
        case "scheduling": return await SchedulingBench.RunAsync(rest);
        case "cluster-standalone": return ClusterBench.StandaloneChild(rest); // the cluster bench's standalone side, run as a child
        default: throw new BenchExit($"bench: unknown verb '{verb}'; known: {Verbs} (bench --help)", 2);
    }
}
catch (BenchExit exit) // a refused command line, or --help / --dry-run: before the verb has started any work
{
    (exit.ExitCode == 0 ? Console.Out : Console.Error).WriteLine(exit.Message);
    return exit.ExitCode;
}
return 0;
