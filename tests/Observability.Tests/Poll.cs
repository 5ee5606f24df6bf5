// Waiting for a condition with a deadline, never for a fixed time.
namespace DeepSeekCluster.Observability.Tests;

public static class Poll
{
    public static async Task UntilAsync(Func<Task<bool>> condition, TimeSpan deadline, Func<string> failure, TimeSpan? every = null)
    {
        var until = DateTime.UtcNow + deadline;
        while (!await condition())
        {
            if (DateTime.UtcNow > until) throw new TimeoutException($"after {deadline.TotalSeconds:F0} s: {failure()}");
            await Task.Delay(every ?? TimeSpan.FromMilliseconds(250));
        }
    }

    public static Task UntilAsync(Func<bool> condition, TimeSpan deadline, Func<string> failure) =>
        UntilAsync(() => Task.FromResult(condition()), deadline, failure);
}
