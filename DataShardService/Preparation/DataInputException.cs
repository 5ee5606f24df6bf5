// Errors a caller sees (bad input, unknown dataset, corrupt shard, storage out of reach); each message names the input or
// the endpoint. Not for internal invariants.
namespace DeepSeekCluster.DataShardService.Preparation;

public enum DataErrorKind
{
    InvalidInput, // maps to gRPC InvalidArgument
    NotFound,     // NotFound
    OutOfRange,   // OutOfRange
    Corrupt,      // DataLoss
    Unavailable,  // Unavailable: blob storage did not answer within the retry window; worth retrying later
}

public sealed class DataInputException(DataErrorKind kind, string message) : Exception(message)
{
    public DataErrorKind Kind { get; } = kind;

    public static DataInputException Invalid(string message) => new(DataErrorKind.InvalidInput, message);
}
