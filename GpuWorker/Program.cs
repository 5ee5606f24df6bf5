// gpu-worker: one process per accelerator. Verbs: train (standalone, no cluster) and generate (from a HF model folder).
using DeepSeekCluster.GpuWorker;

try
{
    return args.FirstOrDefault() switch
    {
        "train" => StandaloneCommands.Train(args[1..]),
        "generate" => StandaloneCommands.Generate(args[1..]),
        null or "help" or "--help" or "-h" => Usage(0),
        var other => Fail($"unknown verb '{other}'"),
    };
}
catch (Exception e) when (e is ArgumentException or FileNotFoundException or DirectoryNotFoundException or InvalidDataException)
{
    return Fail(e.Message);
}

static int Fail(string message)
{
    Console.Error.WriteLine($"gpu-worker: {message}");
    Console.Error.WriteLine("Run 'gpu-worker help' for usage.");
    return 2;
}

static int Usage(int code)
{
    Console.WriteLine(StandaloneCommands.Usage);
    return code;
}
