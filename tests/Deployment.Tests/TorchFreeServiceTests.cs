// The services that run no tensors carry no libtorch: their build output (what `dotnet publish -t:PublishContainer`
// puts in their images, k8s/base) holds none of its files, and their dependency closure names no TorchSharp package.
// Not a check of the worker, which needs libtorch.
using System.Reflection;
using System.Text.Json;

namespace DeepSeekCluster.Deployment.Tests;

public class TorchFreeServiceTests
{
    /// <summary>The services' built assemblies, as MSBuild resolved them for this test's own configuration (Deployment.Tests.csproj).</summary>
    static readonly IReadOnlyList<string> ServiceAssemblies = typeof(TorchFreeServiceTests).Assembly
        .GetCustomAttributes<AssemblyMetadataAttribute>().Where(a => a.Key == "TorchFreeService").Select(a => a.Value!).ToList();

    static readonly string[] ServiceNames = ["DeepSeekCluster.DataShardService", "DeepSeekCluster.Coordinator", "CheckpointStore"];

    public static TheoryData<string> Services() => new(ServiceNames);

    [Fact]
    public void TheBuildNamesTheOutputOfEachTorchFreeService()
    {
        // Guards the tests below: with no paths they would pass on nothing.
        Assert.Equal(ServiceNames.Order(), ServiceAssemblies.Select(p => Path.GetFileNameWithoutExtension(p)).Order());
    }

    [Theory, MemberData(nameof(Services))]
    public void NoLibtorchFileIsInTheOutputFolder(string assembly)
    {
        string folder = OutputFolderOf(assembly);
        var torch = Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories)
            .Where(f => IsLibtorchFile(Path.GetFileName(f))).Select(f => Path.GetRelativePath(folder, f)).ToList();
        Assert.True(torch.Count == 0, $"{folder} holds libtorch files: {string.Join(", ", torch.Take(10))}");
    }

    [Theory, MemberData(nameof(Services))]
    public void NoTorchSharpPackageIsInTheDependencyClosure(string assembly)
    {
        // The deps.json lists what publish would copy, so this holds for the container image even if a stale file lingered.
        string deps = Path.Combine(OutputFolderOf(assembly), assembly + ".deps.json");
        Assert.True(File.Exists(deps), $"{deps} does not exist");
        using var json = JsonDocument.Parse(File.ReadAllText(deps));
        var torch = json.RootElement.GetProperty("libraries").EnumerateObject().Select(l => l.Name)
            .Where(name => name.StartsWith("TorchSharp", StringComparison.OrdinalIgnoreCase) || name.StartsWith("libtorch", StringComparison.OrdinalIgnoreCase)
                        || name.StartsWith("DeepSeekCluster.Training/", StringComparison.Ordinal))
            .ToList();
        Assert.True(torch.Count == 0, $"{deps} depends on {string.Join(", ", torch)}");
    }

    [Theory]
    [InlineData("libtorch_cpu.so", true)]
    [InlineData("libtorch.so", true)]
    [InlineData("libc10.so", true)]
    [InlineData("libLibTorchSharp.so", true)]
    [InlineData("TorchSharp.dll", true)]
    [InlineData("Grpc.Net.Client.dll", false)]
    [InlineData("libgomp.so.1", false)]
    public void TheFileCheckKnowsLibtorchsFiles(string fileName, bool isLibtorch) => Assert.Equal(isLibtorch, IsLibtorchFile(fileName));

    static bool IsLibtorchFile(string fileName) =>
        fileName.StartsWith("libtorch", StringComparison.OrdinalIgnoreCase) || fileName.StartsWith("libc10", StringComparison.OrdinalIgnoreCase)
        || fileName.StartsWith("libLibTorchSharp", StringComparison.OrdinalIgnoreCase) || fileName.Equals("TorchSharp.dll", StringComparison.OrdinalIgnoreCase);

    static string OutputFolderOf(string assembly)
    {
        string path = ServiceAssemblies.SingleOrDefault(p => Path.GetFileNameWithoutExtension(p) == assembly)
            ?? throw new InvalidOperationException($"the build named no output for {assembly} (Deployment.Tests.csproj, TorchFreeService)");
        Assert.True(File.Exists(path), $"{path} was not built");
        return Path.GetDirectoryName(path)!;
    }
}
