// Every input a caller can get wrong gets a gRPC status whose message names that input.
using System.Text;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using Grpc.Core;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class BadInputTests : IAsyncLifetime
{
    private readonly string _folder = TestCorpus.NewFolder("bad");
    private readonly string _store = TestCorpus.NewFolder("store");
    private ServiceHost _host = null!;

    public async Task InitializeAsync() => _host = await ServiceHost.StartAsync(_store);

    public async Task DisposeAsync()
    {
        await _host.DisposeAsync();
        Directory.Delete(_folder, true);
        Directory.Delete(_store, true);
    }

    [Fact]
    public async Task NoSourcesIsRefused()
    {
        var e = await PrepareFails(TestCorpus.Request(32, 300, 100));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("No sources", e.Status.Detail);
    }

    [Fact]
    public async Task AnEmptyFolderIsRefusedNamingIt()
    {
        string empty = Directory.CreateDirectory(Path.Combine(_folder, "empty")).FullName;
        var e = await PrepareFails(Request(new Source { Name = "nothing", Path = empty }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains(empty, e.Status.Detail);
    }

    [Fact]
    public async Task AnEmptyFileIsRefusedNamingTheSource()
    {
        string path = Path.Combine(_folder, "empty.txt");
        File.WriteAllText(path, "");
        var e = await PrepareFails(Request(new Source { Name = "blank", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("'blank'", e.Status.Detail);
        Assert.Contains(path, e.Status.Detail);
    }

    [Fact]
    public async Task AMissingFileIsNotFoundNamingIt()
    {
        string path = Path.Combine(_folder, "no-such-file.txt");
        var e = await PrepareFails(Request(new Source { Name = "ghost", Path = path }));
        Assert.Equal(StatusCode.NotFound, e.StatusCode);
        Assert.Contains(path, e.Status.Detail);
    }

    [Fact]
    public async Task NonUtf8BytesAreRefusedNamingFileAndLine()
    {
        string path = Path.Combine(_folder, "latin1.txt");
        var bytes = new List<byte>();
        bytes.AddRange(Encoding.UTF8.GetBytes("a fine first line of text\nanother fine line\n"));
        bytes.AddRange([(byte)'c', 0xE9, (byte)'t', (byte)'\n']); // Latin-1 'é'
        File.WriteAllBytes(path, bytes.ToArray());
        var e = await PrepareFails(Request(new Source { Name = "latin", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains($"{path} line 3", e.Status.Detail);
        Assert.Contains("UTF-8", e.Status.Detail);
    }

    [Fact]
    public async Task NonUtf8BytesInsideAGzippedJsonLineAreRefusedNamingFileAndLine()
    {
        string path = Path.Combine(_folder, "crawl.jsonl.gz");
        using (var gz = new System.IO.Compression.GZipStream(File.Create(path), System.IO.Compression.CompressionLevel.Fastest))
        {
            gz.Write(Encoding.UTF8.GetBytes("{\"text\": \"fine\"}\n{\"text\": \"caf"));
            gz.Write([0xE9, (byte)'"', (byte)'}', (byte)'\n']); // Latin-1 'é' inside the JSON string
        }
        var e = await PrepareFails(Request(new Source { Name = "crawl", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains($"{path} line 2 is not valid UTF-8", e.Status.Detail);
        Assert.Contains("'crawl'", e.Status.Detail);
    }

    [Fact]
    public async Task AFileOfOnlyBlankLinesIsRefusedAsEmptyNamingTheSource()
    {
        string path = Path.Combine(_folder, "blank.txt.gz");
        using (var gz = new System.IO.Compression.GZipStream(File.Create(path), System.IO.Compression.CompressionLevel.Fastest))
            gz.Write(Encoding.UTF8.GetBytes("\n\n\r\n\n"));
        var e = await PrepareFails(Request(new Source { Name = "blank", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("'blank'", e.Status.Detail);
        Assert.Contains(path, e.Status.Detail);
        Assert.Contains("no documents", e.Status.Detail);
    }

    [Theory]
    [InlineData("truncated")]
    [InlineData("flipped")]
    public async Task ADamagedGzipFileIsRefusedNamingIt(string damage)
    {
        string path = Path.Combine(_folder, $"{damage}.txt.gz");
        using (var buffer = new MemoryStream())
        {
            using (var gz = new System.IO.Compression.GZipStream(buffer, System.IO.Compression.CompressionLevel.Optimal, leaveOpen: true))
                gz.Write(Encoding.UTF8.GetBytes(string.Join("\n\n", TestCorpus.FirstChapters(20))));
            byte[] bytes = buffer.ToArray();
            if (damage == "truncated")
                bytes = bytes[..(bytes.Length / 2)];
            else
                for (int i = bytes.Length / 3; i < bytes.Length / 3 + 64; i++)
                    bytes[i] ^= 0x5A;
            File.WriteAllBytes(path, bytes);
        }
        var e = await PrepareFails(Request(new Source { Name = "damaged", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains(path, e.Status.Detail);
        Assert.Contains("gzip", e.Status.Detail);
    }

    [Fact]
    public async Task AJsonLineThatIsNotJsonIsRefusedNamingFileAndLine()
    {
        string path = Path.Combine(_folder, "broken.jsonl");
        File.WriteAllText(path, "{\"text\": \"fine\"}\n{\"text\": oops}\n");
        var e = await PrepareFails(Request(new Source { Name = "broken", Path = path }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains($"{path} line 2 is not JSON", e.Status.Detail);
    }

    [Fact]
    public async Task AJsonLineWithoutTheTextFieldIsRefusedNamingFileLineAndField()
    {
        string path = Path.Combine(_folder, "fields.jsonl");
        File.WriteAllText(path, "{\"body\": \"no text here\"}\n");
        var e = await PrepareFails(Request(new Source { Name = "fields", Path = path, TextField = "content" }));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains($"{path} line 1 has no string field 'content'", e.Status.Detail);
    }

    [Fact]
    public async Task ABadRequestLeavesNothingInTheStore()
    {
        string path = Path.Combine(_folder, "broken.jsonl");
        File.WriteAllText(path, "not json\n");
        await PrepareFails(Request(new Source { Name = "broken", Path = path }));
        Assert.Empty(Directory.GetFiles(_store, "*", SearchOption.AllDirectories));
    }

    private static PrepareRequest Request(Source source) => TestCorpus.Request(32, 300, 100, source);

    private async Task<RpcException> PrepareFails(PrepareRequest request) =>
        await Assert.ThrowsAsync<RpcException>(async () => await _host.Client.PrepareAsync(request));
}
