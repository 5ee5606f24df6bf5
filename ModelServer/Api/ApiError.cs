// OpenAI's error body ({"error": {message, type, param, code}}) with its HTTP status; thrown by parsing and routing.
using System.Text.Json;
using Microsoft.AspNetCore.Http;

namespace DeepSeekCluster.ModelServer.Api;

public sealed class ApiError(int status, string message, string? param = null, string type = "invalid_request_error", string? code = null)
    : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
    public string Type { get; } = type;
    public string? Code { get; } = code;
    /// <summary>Seconds a client should wait before retrying (429 only).</summary>
    public int? RetryAfterSeconds { get; init; }

    public static ApiError BadRequest(string message, string? param = null) => new(400, message, param);
    public static ApiError UnknownModel(string message, string? param = null) => new(400, message, param, code: "model_not_found");
    public static ApiError NotFound(string message, string? param = null) => new(404, message, param);
    public static ApiError Unauthorized(string message) => new(401, message, type: "invalid_request_error", code: "invalid_api_key");
    public static ApiError Overloaded(string message, int retryAfter) =>
        new(429, message, type: "rate_limit_error", code: "rate_limit_exceeded") { RetryAfterSeconds = retryAfter };

    public async Task WriteAsync(HttpResponse response)
    {
        response.StatusCode = Status;
        if (RetryAfterSeconds is int s) response.Headers.RetryAfter = s.ToString(System.Globalization.CultureInfo.InvariantCulture);
        if (Status == 401) response.Headers.WWWAuthenticate = "Bearer";
        response.ContentType = "application/json";
        var body = new { error = new { message = Message, type = Type, param = Param, code = Code } };
        await response.WriteAsync(JsonSerializer.Serialize(body));
    }
}
