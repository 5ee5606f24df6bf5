// Blob keys of checkpoints ({job}/{step:D8}/{file}) and the validation of the names a caller sends.
using System.Text.RegularExpressions;
using Grpc.Core;

namespace DeepSeekCluster.CheckpointStore.Services;

internal static partial class CheckpointKeys
{
    public const string ManifestName = "manifest.json";
    public const long MaxStep = 99_999_999; // {step:D8}: eight digits keep the keys sorted by step

    [GeneratedRegex("^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    private static partial Regex SafeName();

    [GeneratedRegex("^[0-9a-f]{64}$")]
    private static partial Regex Sha256Hex();

    public static string StepPrefix(string job, long step) => $"{job}/{step:D8}/";
    public static string File(string job, long step, string fileName) => StepPrefix(job, step) + fileName;
    public static string Manifest(string job, long step) => File(job, step, ManifestName);
    public static string RankFile(int rank) => $"rank-{rank}.safetensors";

    /// <summary>The step of a key under <c>{job}/</c>, or null if the key is not in a step folder.</summary>
    public static long? StepOf(string job, string key)
    {
        var rest = key.AsSpan(job.Length + 1);
        int slash = rest.IndexOf('/');
        return slash == 8 && long.TryParse(rest[..8], out long step) ? step : null;
    }

    public static bool IsSafeName(string name) => SafeName().IsMatch(name);

    // "exports" is the folder of ExportStoreService beside the jobs' folders.
    public static string Job(string job) =>
        SafeName().IsMatch(job ?? "") && !job!.Contains("..") && job != "exports"
            ? job
            : throw Invalid($"job '{job}' is not a valid job id: expected 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (and not 'exports')");

    public static long Step(long step) =>
        step is >= 0 and <= MaxStep ? step : throw Invalid($"step {step} is out of range: expected 0 to {MaxStep}");

    public static string FileName(string fileName) =>
        SafeName().IsMatch(fileName ?? "") && fileName != ManifestName && !fileName!.Contains("..")
            ? fileName
            : throw Invalid($"file name '{fileName}' is not valid: expected letters, digits, '.', '_' or '-' (and not '{ManifestName}', which the store writes)");

    public static string Sha256(string sha256, string what) =>
        Sha256Hex().IsMatch(sha256 ?? "") ? sha256! : throw Invalid($"{what} SHA-256 '{sha256}' is not 64 lower-case hex digits");

    public static RpcException Invalid(string message) => new(new Status(StatusCode.InvalidArgument, message));
    public static RpcException Refused(string message) => new(new Status(StatusCode.FailedPrecondition, message));
    public static RpcException NotFound(string message) => new(new Status(StatusCode.NotFound, message));
}
