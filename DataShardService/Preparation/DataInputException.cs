// Errors a caller can cause (bad input, unknown dataset, corrupt shard); each message names the input. Not for internal invariants.
namespace DeepSeekCluster.DataShardService.Preparation;

public enum DataErrorKind
{
    InvalidInput, // maps to gRPC InvalidArgument
    NotFound,     // NotFound
    OutOfRange,   // OutOfRange
    Corrupt,      // DataLoss
}

public sealed class DataInputException(DataErrorKind kind, string message) : Exception(message)
{
    public DataErrorKind Kind { get; } = kind;

    public static DataInputException Invalid(string message) => new(DataErrorKind.InvalidInput, message);
}
