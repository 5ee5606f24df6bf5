// Headless Chromium (Debian's /usr/bin/chromium) driven over the DevTools protocol with a plain WebSocket: navigate,
// evaluate JavaScript, capture screenshots. No Playwright, no driver download.
using System.Diagnostics;
using System.Net.WebSockets;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace DeepSeekCluster.Observability.Tests;

public sealed partial class Chromium : IAsyncDisposable
{
    public const string Binary = "/usr/bin/chromium";

    readonly Process process;
    readonly string profile;
    readonly ClientWebSocket socket = new();
    readonly StringBuilder log = new();
    int nextId;

    Chromium(Process process, string profile) { this.process = process; this.profile = profile; }

    public string Log { get { lock (log) return log.ToString(); } }

    public static async Task<Chromium> StartAsync(int width, int height)
    {
        if (!File.Exists(Binary)) throw new InvalidOperationException($"{Binary} is missing: install Debian's 'chromium' package (CI's .ci/run does)");
        var profile = Directory.CreateTempSubdirectory("chromium-").FullName;
        var psi = new ProcessStartInfo(Binary) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (var a in new[] { "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                                  "--remote-debugging-port=0", $"--user-data-dir={profile}", $"--window-size={width},{height}", "about:blank" })
            psi.ArgumentList.Add(a);
        var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {Binary}");
        var browser = new Chromium(p, profile);
        var devtools = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is null) return;
            lock (browser.log) browser.log.AppendLine(e.Data);
            if (DevToolsLine().Match(e.Data) is { Success: true } m) devtools.TrySetResult(m.Groups[1].Value);
        };
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (browser.log) browser.log.AppendLine(e.Data); };
        p.BeginErrorReadLine();
        p.BeginOutputReadLine();
        string browserUrl;
        try { browserUrl = await devtools.Task.WaitAsync(TimeSpan.FromSeconds(60)); }
        catch (TimeoutException) { await browser.DisposeAsync(); throw new TimeoutException("chromium did not announce its DevTools endpoint:\n" + browser.Log); }
        // The page target (about:blank) is listed on the same port; its socket takes Page.* and Runtime.* commands.
        var port = new Uri(browserUrl).Port;
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
        string? pageUrl = null;
        await Poll.UntilAsync(async () =>
        {
            var list = JsonNode.Parse(await http.GetStringAsync($"http://127.0.0.1:{port}/json/list"))!.AsArray();
            pageUrl = list.FirstOrDefault(t => t?["type"]?.GetValue<string>() == "page")?["webSocketDebuggerUrl"]?.GetValue<string>();
            return pageUrl is not null;
        }, TimeSpan.FromSeconds(30), () => "chromium lists no page target:\n" + browser.Log);
        await browser.socket.ConnectAsync(new Uri(pageUrl!), CancellationToken.None);
        await browser.SendAsync("Page.enable");
        await browser.SendAsync("Emulation.setDeviceMetricsOverride", new JsonObject { ["width"] = width, ["height"] = height, ["deviceScaleFactor"] = 1, ["mobile"] = false });
        return browser;
    }

    /// <summary>Sends one command and returns its result (events that arrive meanwhile are skipped).</summary>
    public async Task<JsonObject> SendAsync(string method, JsonObject? parameters = null)
    {
        int id = ++nextId;
        var message = new JsonObject { ["id"] = id, ["method"] = method, ["params"] = parameters ?? new JsonObject() };
        await socket.SendAsync(Encoding.UTF8.GetBytes(message.ToJsonString()), WebSocketMessageType.Text, true, CancellationToken.None);
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        while (true)
        {
            var reply = await ReceiveAsync(timeout.Token);
            if (reply["id"]?.GetValue<int>() != id) continue;
            if (reply["error"] is JsonNode error) throw new InvalidOperationException($"{method} failed: {error.ToJsonString()}");
            return reply["result"]!.AsObject();
        }
    }

    async Task<JsonObject> ReceiveAsync(CancellationToken ct)
    {
        var buffer = new byte[64 * 1024];
        using var message = new MemoryStream();
        while (true)
        {
            var r = await socket.ReceiveAsync(buffer, ct);
            if (r.MessageType == WebSocketMessageType.Close) throw new InvalidOperationException("chromium closed the DevTools connection:\n" + Log);
            message.Write(buffer, 0, r.Count);
            if (r.EndOfMessage) return JsonNode.Parse(message.ToArray())!.AsObject();
        }
    }

    public Task NavigateAsync(string url) => SendAsync("Page.navigate", new JsonObject { ["url"] = url });

    /// <summary>Evaluates a JavaScript expression in the page and returns its value (JSON-serialisable results only).</summary>
    public async Task<JsonNode?> EvaluateAsync(string expression)
    {
        var result = await SendAsync("Runtime.evaluate", new JsonObject { ["expression"] = expression, ["returnByValue"] = true });
        if (result["exceptionDetails"] is JsonNode ex) throw new InvalidOperationException($"the page threw evaluating {expression}: {ex.ToJsonString()}");
        return result["result"]?["value"]?.DeepClone();
    }

    public async Task<byte[]> ScreenshotAsync()
    {
        var result = await SendAsync("Page.captureScreenshot", new JsonObject { ["format"] = "png", ["captureBeyondViewport"] = true });
        return Convert.FromBase64String(result["data"]!.GetValue<string>());
    }

    public async ValueTask DisposeAsync()
    {
        socket.Dispose();
        if (!process.HasExited)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
        process.Dispose();
        try { Directory.Delete(profile, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    [GeneratedRegex(@"DevTools listening on (ws://\S+)")] private static partial Regex DevToolsLine();
}
